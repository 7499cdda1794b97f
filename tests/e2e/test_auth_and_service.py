"""End-to-end on a 3-node namespace cluster with real containerd (issue 12, items 1 and 7).

Set up as the manifests do it: every agent runs with `--basic-auth-dir` (the Secret's files), and
`spegla configuration` itself writes each node's hosts.toml: the node's own agent first
(`127.0.0.1:5000`, the host port), then the Service (`127.0.0.1:30021`), then upstream, with the
Authorization header under both mirrors.  kube-proxy's part of the NodePort Service is played by
``tests.harness.service_proxy`` on every node: it forwards to the first *ready* agent of its list,
the node's own agent first.

- basic auth: containerd's pulls carry the header from hosts.toml, agents send it to each other
  (node 2 gets everything from node 1, nothing upstream); without it an agent answers 401 to
  anything but its probes, whatever it holds.
- second target: node 2's agent is stopped; node 2's pull goes through the Service to node 3's
  agent, which does not hold the image and fetches it from node 1 (a peer request, served only
  from node 1's own content), so node 2 gets every blob and nothing from upstream.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.shared import counter, upstream_blobs, wait_served_by_peer
from tests.harness import agents as ag
from tests.harness.cluster import REPO_ROOT, UPSTREAM_HOST, Cluster, Node
from tests.harness.containerd import Line
from tests.harness.fixtures import require_harness, short_tempdir
from tests.harness.images import BuiltImage, build_small
from tests.harness.service_proxy import read_log

pytestmark = pytest.mark.root
SERVICE_PORT = 30021
USER, PASSWORD = "spegla", "e2e-secret"
AUTH = {"Authorization": "Basic c3BlZ2xhOmUyZS1zZWNyZXQ="}  # spegla:e2e-secret
Fresh = Callable[[], tuple[BuiltImage, str]]


def _configure_node(c: Cluster, node: Node, secret: Path) -> None:
    """`spegla configuration` as the init container runs it, writing this node's certs.d."""
    argv = [
        sys.executable, "-m", "agent", "configuration",
        f"--containerd-registry-config-path={node.containerd.certs_d}",
        f"--mirrored-registries=http://{UPSTREAM_HOST}",
        f"--mirror-targets=http://127.0.0.1:{ag.REGISTRY_PORT},http://127.0.0.1:{SERVICE_PORT}",
        f"--basic-auth-dir={secret}",
    ]  # fmt: skip
    subprocess.run(argv, check=True, cwd=REPO_ROOT, capture_output=True, timeout=60)


def _service_order(c: Cluster, node: Node) -> list[Node]:
    """The node's own agent first, then the others (node 2: 2, 3, 1 — see the module doc)."""
    return [node, *reversed([n for n in c.nodes if n is not node])]


@pytest.fixture(scope="module")
def c(containerd_line: Line) -> Iterator[Cluster]:
    require_harness()
    cl = Cluster(short_tempdir("spg-auth-"), nodes=3, line=containerd_line)
    try:
        cl.up(large_mib=1)
        secret = cl.workdir / "basic-auth"
        secret.mkdir()
        (secret / "username").write_text(USER + "\n")
        (secret / "password").write_text(PASSWORD + "\n")
        for n in cl.nodes:
            ag.start_agent(cl, n, extra=["--basic-auth-dir", str(secret)], ready_timeout=None)
        for n in cl.nodes:
            ag.wait_ready(n, 30.0, n.processes.get("agent"))
            _configure_node(cl, n, secret)
            endpoints = [f"--endpoint={m.ip}:{ag.REGISTRY_PORT}" for m in _service_order(cl, n)]
            argv = [
                sys.executable, "-m", "tests.harness.service_proxy",
                "--listen", f"127.0.0.1:{SERVICE_PORT}", "--log", str(n.workdir / "service.jsonl"),
                *endpoints,
            ]  # fmt: skip
            cl.start_on_node(n, "service", argv, ready_url=f"http://127.0.0.1:{SERVICE_PORT}/livez")
        yield cl
    finally:
        cl.down()


@pytest.fixture
def fresh(c: Cluster, tmp_path: Path) -> Fresh:
    counter = iter(range(100))

    def make() -> tuple[BuiltImage, str]:
        name = f"auth-{hashlib.sha256(str(tmp_path).encode()).hexdigest()[:8]}-{next(counter)}"
        img = build_small(tmp_path / "img", name=name)
        return img, c.upstream.push(img)

    return make


def _blob_url(agent: Node, name: str, digest: str) -> str:
    return f"http://{agent.ip}:{ag.REGISTRY_PORT}/v2/e2e/{name}/blobs/{digest}?ns={UPSTREAM_HOST}"


def _service_answers_from(node: Node, endpoint: Node) -> bool:
    """Does `node`'s Service port now forward to `endpoint`'s agent (as kube-proxy would once
    the endpoints follow readiness)?"""
    try:
        status = node.http_get(f"http://127.0.0.1:{SERVICE_PORT}/readyz", timeout=2.0)[0]
    except OSError:
        return False
    last = read_log(node.workdir / "service.jsonl")[-1:]
    return status == 200 and last == [f"{endpoint.ip}:{ag.REGISTRY_PORT}"]


def test_hosts_toml_written_by_configuration_carries_the_header(c: Cluster) -> None:
    text = (c.node(2).containerd.certs_d / UPSTREAM_HOST / "hosts.toml").read_text()
    hosts = tomllib.loads(text)["host"]
    ours = [f"http://127.0.0.1:{ag.REGISTRY_PORT}", f"http://127.0.0.1:{SERVICE_PORT}"]
    assert list(hosts) == ours  # the agent first, then the Service
    assert [hosts[url]["header"] for url in ours] == [AUTH, AUTH]


def test_pulls_through_auth_enabled_agents(c: Cluster, fresh: Fresh) -> None:
    img, ref = fresh()
    n1, n2, n3 = c.nodes
    mark = c.upstream.mark()
    n1.pull(ref)
    assert upstream_blobs(c, n1, mark) == set(img.blob_digests())
    layer = img.blob_digests()[-1]
    # Without credentials nothing is told: held and unknown content get the same 401.
    for digest in (layer, "sha256:" + "0" * 64):
        for headers in (None, {"Authorization": "Basic c3BlZ2xhOndyb25n"}):  # spegla:wrong
            status, _, body = n3.http_get(_blob_url(n1, img.name, digest), headers=headers)
            assert status == 401, (digest, status)
            assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
    status, _, body = n3.http_get(_blob_url(n1, img.name, layer), headers=AUTH)
    assert status == 200 and hashlib.sha256(body).hexdigest() == layer.removeprefix("sha256:")
    assert n3.http_get(f"http://{n1.ip}:{ag.REGISTRY_PORT}/readyz")[0] == 200
    # containerd sends the header from hosts.toml; the agents send it to each other
    wait_served_by_peer(n2, img.name, img.blob_digests(), timeout=20, headers=AUTH)
    hits_before, _ = ag.mirror_counts(n2)
    mark2 = c.upstream.mark()
    assert n2.pull(ref).image_id == img.for_platform().config.digest
    assert upstream_blobs(c, n2, mark2) == set()
    assert all(n2.containerd.has_blob(d) for d in img.blob_digests())
    assert ag.mirror_counts(n2)[0] > hits_before


def test_node_without_agent_pulls_through_the_service(c: Cluster, fresh: Fresh) -> None:
    img, ref = fresh()
    n1, n2, n3 = c.nodes
    mark = c.upstream.mark()
    n1.pull(ref)
    assert upstream_blobs(c, n1, mark) == set(img.blob_digests())
    wait_served_by_peer(n3, img.name, img.blob_digests(), timeout=20, headers=AUTH)
    ag.stop_agent(c, n2)
    try:
        service_log = n2.workdir / "service.jsonl"
        deadline = time.monotonic() + 10
        while not _service_answers_from(n2, n3):
            assert time.monotonic() < deadline, "the Service stand-in never dropped node 2's agent"
            time.sleep(0.1)
        forwarded_before = len(read_log(service_log))
        hits3_before, _ = ag.mirror_counts(n3)
        mark2 = c.upstream.mark()
        assert n2.pull(ref).image_id == img.for_platform().config.digest
        # every blob from the cluster, none from upstream (by node 2, or by anyone for it)
        assert upstream_blobs(c, n2, mark2) == set()
        assert [r for r in c.upstream.blob_fetches(mark2)] == []
        assert all(n2.containerd.has_blob(d) for d in img.blob_digests())
        # the pull went through the Service to node 3's agent, which fetched from node 1
        forwarded = read_log(service_log)[forwarded_before:]
        assert forwarded and all(e == f"{n3.ip}:{ag.REGISTRY_PORT}" for e in forwarded)
        assert ag.mirror_counts(n3)[0] >= hits3_before + len(img.blob_digests())
    finally:
        ag.start_agent(c, n2, extra=["--basic-auth-dir", str(c.workdir / "basic-auth")])


def _answered_401(node: Node) -> float:
    return counter(node, "http_request_duration_seconds_count", code="401")


def test_containerd_without_the_header_falls_back_upstream(c: Cluster, fresh: Fresh) -> None:
    """A node whose hosts.toml lacks the header (credentials changed, init container not re-run):
    the agents answer 401, containerd treats that as "next host" and the pull still works, from
    upstream."""
    img, ref = fresh()
    n1 = c.node(1)
    path = n1.containerd.certs_d / UPSTREAM_HOST / "hosts.toml"
    configured = path.read_text()
    try:
        path.write_text(
            "\n".join(line for line in configured.splitlines() if "Authorization" not in line)
        )
        refused_before = _answered_401(n1)
        mark = c.upstream.mark()
        assert n1.pull(ref).image_id == img.for_platform().config.digest
        assert upstream_blobs(c, n1, mark) == set(img.blob_digests())
        assert _answered_401(n1) > refused_before
    finally:
        path.write_text(configured)


def test_service_reaches_the_holder_and_every_agent_down_means_upstream(
    c: Cluster, fresh: Fresh
) -> None:
    """Agents of nodes 2 and 3 down: node 2's pull goes through the Service to node 1, which
    serves its own content.  Then node 1's too: the Service has no ready agent, containerd goes
    on to upstream and the pull still works."""
    img, ref = fresh()
    n1, n2, n3 = c.nodes
    n1.pull(ref)
    ag.stop_agent(c, n2)
    ag.stop_agent(c, n3)
    secret = ["--basic-auth-dir", str(c.workdir / "basic-auth")]
    try:
        deadline = time.monotonic() + 10
        while not _service_answers_from(n2, n1):
            assert time.monotonic() < deadline, "the Service stand-in never chose node 1's agent"
            time.sleep(0.1)
        mark = c.upstream.mark()
        assert n2.pull(ref).image_id == img.for_platform().config.digest
        assert c.upstream.blob_fetches(mark) == []
        assert all(n2.containerd.has_blob(d) for d in img.blob_digests())

        other, other_ref = fresh()
        ag.stop_agent(c, n1)
        deadline = time.monotonic() + 10
        while _service_answers_from(n2, n1):
            assert time.monotonic() < deadline, "the Service stand-in kept a stopped agent"
            time.sleep(0.1)
        mark = c.upstream.mark()
        assert n2.pull(other_ref).image_id == other.for_platform().config.digest
        assert upstream_blobs(c, n2, mark) == set(other.blob_digests())
    finally:
        for n in (n1, n2, n3):
            if "agent" not in n.processes:
                ag.start_agent(c, n, extra=secret, ready_timeout=None)
        for n in (n1, n2, n3):
            ag.wait_ready(n, 30.0, n.processes.get("agent"))
