"""Comments and docstrings name only things that exist, and cite no document outside the repo.

Why: comments state invariants; the history and the measurements behind a choice live in
`docs/decisions/`.  A comment that names a module that moved, a document that is not in the
repository (design notes, a spec's section numbers) or an issue number sends a reader to something
they cannot find.  This reads every comment and docstring of the code, the benches,
the tooling and the tests (tokenize and ast, no imports) and checks each module path
(`registry.mirror.run`, `registry.mirror.run.MirrorRun`) and each file path (`registry/http/`,
`agent/containerd/ingest.py`) against the tree.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOPS = ("agent", "dht", "registry", "bench", "hack", "tests")
# product code cites no issue either (a test may say which requirement it proves)
PRODUCT = ("agent", "dht", "registry", "bench", "hack", "tests/harness")

_ALTERNATIVES = "|".join(TOPS)
_DOTTED = re.compile(rf"(?<![\w./-])((?:{_ALTERNATIVES})(?:\.[A-Za-z_]\w*)+)")
_SLASHED = re.compile(rf"(?<![\w./-])((?:{_ALTERNATIVES}|docs|manifests)/[\w./-]*\w)")
_OUTSIDE = re.compile(r"stack[ -]notes|§\s*\d", re.IGNORECASE)
_ISSUE = re.compile(r"\bissue \d+", re.IGNORECASE)
# names that look like module paths but are not: logger names, file names, image references
_NOT_MODULES = {"registry.access", "registry.configPath", "agent.log"}
_NOT_PATHS = {"registry/repo", "registry/repository"}
_FILE_SUFFIXES = ("py", "md", "sh", "toml", "json", "yaml", "yml", "txt", "html", "proto")


def _python_files() -> list[Path]:
    files = []
    for top in TOPS:
        for path in sorted((ROOT / top).rglob("*.py")):
            if "proto" not in path.relative_to(ROOT).parts:
                files.append(path)
    return files


def _texts(path: Path) -> Iterator[tuple[int, str]]:
    """(line, text) of every comment and docstring of a Python file."""
    source = path.read_text()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            docstring = ast.get_docstring(node, clean=False)
            if docstring is not None:
                yield node.body[0].lineno, docstring


def _defines(path: Path, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", path.read_text()) is not None


def _module_exists(dotted: str) -> bool:
    """`a.b.c[.Name]`: packages and modules down the path, then one name the module mentions."""
    parts = dotted.split(".")
    if parts[-1] in _FILE_SUFFIXES:
        return True  # a file name (`run.py`) rather than a module path
    place = ROOT / parts[0]
    for i, part in enumerate(parts[1:], start=1):
        if (place / part).is_dir():
            place = place / part
        elif (place / f"{part}.py").is_file():
            place = place / f"{part}.py"
            rest = parts[i + 1 :]
            return not rest or _defines(place, rest[0])
        else:
            init = place / "__init__.py"
            return place.is_dir() and init.is_file() and _defines(init, part)
    return True


def _path_exists(path: str) -> bool:
    return (ROOT / path).exists() or (ROOT / f"{path}.py").exists()


def _problems(path: Path) -> list[str]:
    rel = path.relative_to(ROOT).as_posix()
    product = rel.startswith(PRODUCT)
    found = []
    for line, text in _texts(path):
        for pattern in (_OUTSIDE, _ISSUE) if product else (_OUTSIDE,):
            if outside := pattern.search(text):
                found.append(f"{rel}:{line}: cites {outside.group(0)!r}")
        for dotted in _DOTTED.findall(text):
            dotted = dotted.rstrip(".")
            if dotted not in _NOT_MODULES and not _module_exists(dotted):
                found.append(f"{rel}:{line}: no module or name {dotted}")
        for named in _SLASHED.findall(text):
            if "<" not in named and named not in _NOT_PATHS and not _path_exists(named):
                found.append(f"{rel}:{line}: no file {named}")
    return found


def test_comments_name_what_exists() -> None:
    problems = [problem for path in _python_files() for problem in _problems(path)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("the `registry.mirror.run` module", []),
        ("see `registry.mirror.run.MirrorRun`", []),
        ("see registry.forwarder", ["no module or name registry.forwarder"]),
        ("see registry.mirror.run.NoSuchThing", ["no module or name registry.mirror.run.NoSuch"]),
        ("`registry/http/` and registry/http/dial.py", []),
        ("tests/registry/test_nothing", ["no file tests/registry/test_nothing"]),
        ("measured in stack notes §2.2", ["cites 'stack notes'"]),
        ("as issue 17 asks", ["cites 'issue 17'"]),
    ],
)
def test_the_checks_catch_what_they_should(
    tmp_path: Path, text: str, expected: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    probe = ROOT / "registry" / "_probe_for_test_comments.py"
    monkeypatch.setattr(
        "tests.test_comments._texts", lambda path: iter([(1, text)]) if path == probe else iter([])
    )
    found = _problems(probe)
    assert len(found) == len(expected)
    for problem, want in zip(found, expected, strict=True):
        assert want in problem
