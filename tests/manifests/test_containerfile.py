"""Static checks of the Containerfile (no container engine here to build it, and no hadolint).

Why: the image is what every node runs; a wrong COPY path, a final stage that is not the builder's
Python, or an entrypoint that is not the `spegla` console script would only show up on a cluster.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Containerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in _instructions():
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_two_stages_on_the_same_python() -> None:
    stages = _stages()
    assert len(stages) == 2
    build_from, final_from = stages[0][0][1], stages[1][0][1]
    assert build_from.endswith(" AS build") and build_from.split()[0] == final_from
    default = next(rest for kw, rest in _instructions() if kw == "ARG" and "PYTHON_IMAGE=" in rest)
    version = re.search(r"python:(\d+\.\d+)-slim", default)
    assert version is not None
    requires = str(_pyproject()["project"]["requires-python"])  # type: ignore[index]
    assert requires == ">=3.11" and tuple(map(int, version.group(1).split("."))) >= (3, 11)


def test_final_stage_only_copies_the_environment() -> None:
    final = _stages()[1]
    assert not [rest for kw, rest in final if kw == "RUN"], "no build step in the final stage"
    copies = [rest for kw, rest in final if kw == "COPY"]
    assert copies == ["--from=build /opt/spegla /opt/spegla"]


def test_build_stage_copies_what_the_wheel_needs() -> None:
    sources = []
    for kw, rest in _stages()[0]:
        if kw == "COPY":
            sources += rest.split()[:-1]
    assert sorted(sources) == ["README.md", "agent", "dht", "pyproject.toml", "registry"]
    for source in sources:
        assert (ROOT / source).exists(), source
    packages = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]  # type: ignore[index]
    assert {p.rstrip("*") for p in packages} <= set(sources)
    ignore = (ROOT / ".containerignore").read_text().split()
    for source in [*sources, "Containerfile"]:
        assert f"!{source}" in ignore, f"{source} is excluded by .containerignore"


def test_entrypoint_is_the_spegla_console_script_run_as_root() -> None:
    instructions = dict(_stages()[1])
    assert json.loads(instructions["ENTRYPOINT"]) == ["spegla"]
    assert _pyproject()["project"]["scripts"] == {"spegla": "agent.cli.main:main"}  # type: ignore[index]
    assert instructions["USER"] == "0:0"
    text = (ROOT / "Containerfile").read_text()
    assert "containerd's socket" in text and "content directory" in text, "document why root"


def test_oci_labels_match_the_project() -> None:
    labels = dict(
        re.findall(
            r'(org\.opencontainers\.image\.[a-z]+)="([^"]*)"', (ROOT / "Containerfile").read_text()
        )
    )
    project = _pyproject()["project"]
    assert labels["org.opencontainers.image.title"] == project["name"]  # type: ignore[index]
    assert labels["org.opencontainers.image.licenses"] == project["license"]["text"]  # type: ignore[index]
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert f"ARG VERSION={project['version']}" in (ROOT / "Containerfile").read_text()  # type: ignore[index]


def test_removed_kubernetes_aio_is_not_used() -> None:
    for package in ("agent", "dht", "registry"):
        for path in (ROOT / package).rglob("*.py"):
            assert "kubernetes.aio" not in path.read_text(encoding="utf-8"), path
            assert "kubernetes import aio" not in path.read_text(encoding="utf-8"), path
