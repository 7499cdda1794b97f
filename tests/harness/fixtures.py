"""pytest fixtures for tests against real containerd, a real registry and network namespaces.

Why: one place that builds the test images once per session, runs the upstream registry, starts
isolated containerd instances and brings up namespace clusters, and that skips with a clear reason
when the machine cannot (not root, a Debian package missing).  Registered in tests/conftest.py.

Fixtures (all skip unless root with containerd, docker-registry, skopeo and ip installed):
- ``test_images`` (session) -> ``TestImages`` (small, multi, docker, large=4 MiB).
- ``upstream_registry`` (session) -> loopback ``Upstream`` with all test images pushed
  (``.pushed[name]`` is the reference); use ``.mark()`` + ``since=`` to see your test's
  requests only.
- ``containerd_line`` -> the ``Line`` a test runs on: parametrized over 1.6 and 2.x (ids
  ``ctrd1.6``, ``ctrd2.2``; 2.x skips with the reason when ``../shared/containerd/`` is absent).
  Every fixture below that starts containerd uses it, so every real-containerd test runs on both;
  module-scoped, so a module's shared cluster can be built on it. A test that does not depend on
  containerd's behaviour can pin one line with
  ``@on_one_line`` (say why in a comment).
- ``containerd_factory`` -> ``make(name="c", netns=None, **options) -> Containerd`` (started;
  stopped and removed after the test; options go to ``Containerd``).
  ``containerd_instance`` -> one started loopback ``Containerd``.
- ``cri_client`` -> ``CriClient`` on ``containerd_instance``.
- ``cluster`` -> ``make(nodes=3, rate_mbit=None) -> Cluster`` (namespaces, upstream with test
  images, one containerd per node, on ``containerd_line``); torn down after the test.
Real agents on a cluster: ``tests.harness.agents.start_agents(cluster)`` (see that module).
Mark such tests ``@pytest.mark.root``.  When a test fails while a cluster is up, the report gets
the tail of every node's agent, mirror and containerd log.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .cluster import ACTIVE, Cluster, exit_on_sigterm, log_tails
from .containerd import LINE_1_6, LINES, Containerd, Line
from .cri import CriClient
from .images import TestImages, build_test_set
from .upstream import Upstream

REQUIRED_TOOLS = ("containerd", "docker-registry", "skopeo", "ip")


def missing_requirements() -> str | None:
    """Why the real-component harness cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, containerd)"
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing Debian tools: {', '.join(missing)} (run hack/setup.sh as root)"
    return None


def require_harness() -> None:
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)


def short_tempdir(prefix: str) -> Path:
    """A short path under the temp dir: unix socket paths must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix))


@pytest.fixture(scope="session")
def test_images(tmp_path_factory: pytest.TempPathFactory) -> TestImages:
    require_harness()
    return build_test_set(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def upstream_registry(
    test_images: TestImages, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Upstream]:
    up = Upstream(tmp_path_factory.mktemp("upstream"))
    with up:
        for image in test_images.all:
            up.push(image)
        yield up


def require_line(line: Line) -> None:
    require_harness()
    reason = line.missing()
    if reason:
        pytest.skip(reason)


# for a test whose behaviour does not depend on containerd: run it on one line only (1.6)
on_one_line = pytest.mark.parametrize(
    "containerd_line", [LINE_1_6], indirect=True, ids=[LINE_1_6.id]
)


@pytest.fixture(scope="module", params=LINES, ids=[line.id for line in LINES])
def containerd_line(request: pytest.FixtureRequest) -> Line:
    line: Line = request.param
    require_line(line)
    return line


@pytest.fixture
def containerd_factory(containerd_line: Line) -> Iterator[Callable[..., Containerd]]:
    require_harness()
    made: list[Containerd] = []

    def make(name: str = "c", netns: str | None = None, **options: Any) -> Containerd:
        options.setdefault("line", containerd_line)
        c = Containerd(
            short_tempdir(f"spg-{name}-"), netns=netns, name=f"containerd-{name}", **options
        )
        made.append(c)
        return c.start()

    yield make
    for c in made:
        c.remove()


@pytest.fixture
def containerd_instance(containerd_factory: Callable[..., Containerd]) -> Containerd:
    return containerd_factory()


@pytest.fixture
def cri_client(containerd_instance: Containerd) -> CriClient:
    return CriClient(containerd_instance.socket)


@pytest.fixture
def cluster(test_images: TestImages, containerd_line: Line) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(nodes: int = 3, rate_mbit: float | None = None) -> Cluster:
        c = Cluster(
            short_tempdir("spg-cluster-"), nodes=nodes, rate_mbit=rate_mbit, line=containerd_line
        )
        made.append(c)
        c.up(images=test_images)
        return c

    yield make
    for c in made:
        c.down()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call" and report.failed:
        for c in ACTIVE:
            for title, text in log_tails(c).items():
                report.sections.append((f"log tail: {title}", text))


def pytest_sessionstart(session: pytest.Session) -> None:
    # a SIGTERM'd test run (CI timeout, `timeout`, kill) still runs fixture teardown
    exit_on_sigterm()
