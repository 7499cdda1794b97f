"""The package layering the packages' docstrings state, enforced on every import in the code.

Each package of `registry/` and `agent/` has a layer; a module may import its own package and
packages of lower layers only (runtime imports inside functions included, `TYPE_CHECKING`
imports too), and no two modules may import each other through any chain (no cycles).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# (package prefix, layer): the longest matching prefix decides; a lower layer never imports a higher
LAYERS: dict[str, int] = {
    "dht": 0,
    "registry": 0,  # registry/__init__.py
    "registry.oci": 0,
    "registry.auth": 1,
    "registry.interfaces": 0,
    "registry.events": 0,
    "registry.metrics": 0,
    "registry.http": 2,
    "registry.burst": 3,
    "registry.mirror": 4,
    "registry.serve": 5,
    "agent.proto": 6,
    "agent.config": 6,
    "agent.flag": 6,
    "agent.logs": 6,
    "agent.containerd": 7,
    "agent.observability": 8,
    "agent.node": 9,
    "agent.advertising": 9,
    "agent.runtime": 10,
    "agent.doctor": 10,
    "agent.cli": 11,
    "agent": 11,  # agent/__init__.py, agent/__main__.py
}
# packages of one layer that must not import each other
SIBLINGS_APART = [("agent.node", "agent.advertising"), ("agent.runtime", "agent.doctor")]


def _package(module: str) -> str:
    best = ""
    for prefix in LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
            best = prefix
    return best


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for top in ("registry", "agent", "dht"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if "proto" in path.parts:
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(module: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level if path.name != "__init__.py" else None]
                if path.name == "__init__.py" and node.level > 1:
                    base = base[: -(node.level - 1)]
                stem = ".".join([*base, node.module] if node.module else base)
            else:
                stem = node.module or ""
            names.add(stem)
            names.update(f"{stem}.{alias.name}" for alias in node.names)
    return {name for name in names if name.split(".")[0] in ("registry", "agent", "dht")}


MODULES = _modules()
GRAPH = {
    module: {name for name in _imports(module, path) if name in MODULES and name != module}
    for module, path in MODULES.items()
}


def test_every_module_has_a_layer() -> None:
    assert [m for m in MODULES if not _package(m)] == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module: str) -> None:
    own = _package(module)
    wrong = []
    for target in sorted(GRAPH[module]):
        other = _package(target)
        if other == own or other == "" or (target.startswith(own + ".") and own != "agent"):
            continue
        if LAYERS[other] > LAYERS[own]:
            wrong.append(
                f"{module} ({own}, layer {LAYERS[own]}) imports {target} (layer {LAYERS[other]})"
            )
        if (own, other) in SIBLINGS_APART or (other, own) in SIBLINGS_APART:
            wrong.append(f"{module} ({own}) imports its sibling package's {target}")
    assert wrong == []


def test_no_import_cycles() -> None:
    """Module-level cycles (a package's __init__ re-exporting is not counted as an edge back)."""
    edges = {
        module: {t for t in targets if not (MODULES[t].name == "__init__.py")}
        for module, targets in GRAPH.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert cycles == []


def test_the_checker_sees_a_wrong_import(tmp_path: Path) -> None:
    """The rule can fail: a mirror module importing the app is caught."""
    fake = tmp_path / "x.py"
    fake.write_text("from registry.serve.app import create_app\n")
    targets = _imports("registry.mirror.x", fake)
    assert "registry.serve.app" in targets
    assert LAYERS[_package("registry.serve.app")] > LAYERS[_package("registry.mirror.x")]
