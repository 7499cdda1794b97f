"""The README and docs/ link to files and headings that exist, name repository paths that exist,
docs/decisions/README.md indexes every decision, docs/metrics.md names every metric the agent
exports and docs/benchmarks.md every bench script, and the README's platform table covers every
containerd line and distribution an operator asks about.

Why: the operator documentation is split over several files; a renamed heading or a moved file
breaks the path from the README to the answer without anything else noticing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# written on other branches at the same time as these pages (the image build, the security model)
ELSEWHERE = {ROOT / "docs" / "image.md", ROOT / "SECURITY.md"}
_LINK = re.compile(r"\]\(([^)\s]+)\)")
# a repository path named in prose or code: a top-level folder of this repository, then more
_REPO_PATH = re.compile(
    r"(?<![\w./-])((?:agent|registry|dht|tests|bench|hack|manifests|docs)/[\w./-]*\w)"
)
# `registry/repo:tag` and `registry/repository` name image references, not files
_NOT_PATHS = {"registry/repo", "registry/repository"}


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_reach_a_file_and_heading(page: Path) -> None:
    for target in _LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if linked in ELSEWHERE and not linked.exists():
            continue
        assert linked.exists(), f"{page.name}: {target} does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{page.name}: no heading #{anchor} in {path}"


def _exists(path: str) -> bool:
    """A file or folder, or a module named without its `.py`."""
    return (ROOT / path).exists() or (ROOT / f"{path}.py").exists()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_repository_paths_exist(page: Path) -> None:
    missing = [
        path
        for path in _REPO_PATH.findall(page.read_text())
        if "<" not in path and path not in _NOT_PATHS and not _exists(path)
    ]
    assert not missing, f"{page.name} names paths that do not exist: {missing}"


def test_decisions_index_lists_every_decision() -> None:
    folder = ROOT / "docs" / "decisions"
    index = (folder / "README.md").read_text()
    listed = set(_LINK.findall(index))
    files = {p.name for p in folder.glob("*.md") if p.name != "README.md"}
    assert files, "no decisions"
    assert files <= listed, f"not in docs/decisions/README.md: {sorted(files - listed)}"


def test_metrics_page_names_every_metric() -> None:
    """Every `spegel_*` / `spegla_*` name the code registers is explained on docs/metrics.md."""
    names = set()
    for top in ("agent", "registry", "dht"):
        for path in (ROOT / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    if re.fullmatch(r"spegl[ae]_[a-z_]+", node.value):
                        names.add(node.value)
    page = (ROOT / "docs" / "metrics.md").read_text()
    assert names, "no metrics found"
    assert not {name for name in names if f"`{name}`" not in page}


def test_benchmarks_page_names_every_bench() -> None:
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    benches = {p.stem for p in (ROOT / "bench").glob("*.py") if p.stem != "__init__"}
    assert benches, "no bench scripts"
    assert not {name for name in benches if f"bench.{name}" not in page}


def test_every_page_is_reachable_from_the_readme() -> None:
    """Following relative links from the README reaches every page under docs/."""
    seen: set[Path] = set()
    todo = [ROOT / "README.md"]
    while todo:
        page = todo.pop()
        if page in seen or page.suffix != ".md" or not page.is_file():
            continue
        seen.add(page)
        for target in _LINK.findall(page.read_text()):
            if not target.startswith(("http://", "https://", "mailto:", "#")):
                todo.append((page.parent / target.partition("#")[0]).resolve())
    pages = {p.resolve() for p in (ROOT / "docs").rglob("*.md")}
    assert not sorted(str(p.relative_to(ROOT)) for p in pages - seen)


def test_slug_matches_githubs_rule() -> None:
    assert _slug("Clusters without hostPort support: `components/node-port-local`") == (
        "clusters-without-hostport-support-componentsnode-port-local"
    )
    assert _slug("Verify that peers serve pulls") == "verify-that-peers-serve-pulls"


def test_readme_platform_table_names_every_line_and_distribution() -> None:
    text = (ROOT / "README.md").read_text()
    rows = {line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")}
    for containerd in ("1.6", "1.7", "2.0", "2.1 and newer"):
        assert containerd in rows, containerd
    for name in (
        "kubeadm",
        "kind",
        "EKS (AL2023)",
        "AKS",
        "GKE",
        "k3s, RKE2",
        "Talos",
        "k0s",
        "Bottlerocket",
    ):
        assert name in rows, name
    assert text.count("tested here") >= 2 and "not tested here" in text
