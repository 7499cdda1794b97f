"""End-to-end bursts (issue 10, item 7): nodes pull one new image at the same moment.

Real containerd and agents per node in namespaces, the upstream behind a tbf-shaped link.  With
the claim protocol one node's containerd fetches each layer upstream while the others stream it
from that node's download as it arrives (or from each other), so the upstream access log shows
each layer fetched by one node only.  Images are small (a few MiB at 16 Mbit/s: seconds).
"""

from __future__ import annotations

import collections
import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.shared import assert_intact, cluster_with_agents, ingest_bytes
from tests.harness import agents as ag
from tests.harness.cluster import Cluster, Node, PullResult
from tests.harness.containerd import Line
from tests.harness.images import BuiltImage, build_large

pytestmark = pytest.mark.root

RATE_MBIT = 16  # 8 MiB take ~4 s upstream


@pytest.fixture(scope="module")
def c(containerd_line: Line) -> Iterator[Cluster]:
    with cluster_with_agents(
        "spg-burst-",
        nodes=3,
        large_mib=1,
        extra=["--mirror-claim-wait", "20s", "--mirror-request-deadline", "20s"],
        line=containerd_line,
    ) as cl:
        yield cl


def _fresh(c: Cluster, tmp_path: Path, size_mib: int = 8) -> tuple[BuiltImage, str]:
    name = f"burst-{hashlib.sha256(str(tmp_path).encode()).hexdigest()[:8]}"
    img = build_large(tmp_path / "img", size_mib, name=name)
    return img, c.upstream.push(img)


def _pull_at_once(nodes: list[Node], ref: str) -> dict[str, PullResult | BaseException]:
    results: dict[str, PullResult | BaseException] = {}
    start = threading.Barrier(len(nodes))

    def pull(n: Node) -> None:
        start.wait()
        try:
            results[n.name] = n.pull(ref, timeout=120)
        except BaseException as e:
            results[n.name] = e

    threads = [threading.Thread(target=pull, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    return results


def _layer_fetchers(c: Cluster, img: BuiltImage, mark: int) -> dict[str, set[str]]:
    """Per layer digest: the node addresses whose GETs of it reached the upstream."""
    who: dict[str, set[str]] = collections.defaultdict(set)
    layers = {layer.digest for layer in img.for_platform().layers}
    for r in c.upstream.blob_fetches(mark):
        if r.blob_digest in layers:
            who[r.blob_digest].add(r.remote_ip)
    return who


def _assert_intact(nodes: list[Node], img: BuiltImage) -> None:
    for n in nodes:
        assert_intact(n, img)


def _counts(nodes: list[Node]) -> collections.Counter[str]:
    """Claim outcomes and in-flight mirror hits over `nodes` (from their /metrics)."""
    out: collections.Counter[str] = collections.Counter()
    for n in nodes:
        for (name, labels), value in ag.metrics(n).items():
            tags = dict(labels)
            if name == "spegla_claim_outcomes_total":
                out[tags["outcome"]] += int(value)
            elif name == "spegel_mirror_requests_total" and tags.get("cache") == "inflight":
                out["inflight_hits"] += int(value)
    return out


def _burst(c: Cluster, nodes: list[Node], tmp_path: Path) -> None:
    img, ref = _fresh(c, tmp_path)
    before = _counts(c.nodes)
    layers = [layer.digest for layer in img.for_platform().layers]
    mark = c.upstream.mark()
    c.limit_upstream(RATE_MBIT)
    try:
        results = _pull_at_once(nodes, ref)
    finally:
        c.unlimit_upstream()
    failed = {name: r for name, r in results.items() if isinstance(r, BaseException)}
    assert not failed, failed
    _assert_intact(nodes, img)
    fetchers = _layer_fetchers(c, img, mark)
    assert set(fetchers) == set(layers)  # every layer went upstream once: nobody had it
    assert all(len(ips) == 1 for ips in fetchers.values()), dict(fetchers)
    # bytes, not just requests: a resumed upstream fetch would still be one node
    size = sum(layer.size for layer in img.for_platform().layers)
    layer_bytes = sum(
        r.bytes for r in c.upstream.blob_fetches(mark) if r.blob_digest in set(layers)
    )
    assert layer_bytes <= size * 1.05, (layer_bytes, size)
    # and it was a burst: claims decided it, the others streamed downloads still under way
    counts = _counts(c.nodes) - before
    logs = "\n".join(
        line
        for n in nodes
        for line in n.processes["agent"].log_text().splitlines()
        if "mirror" in line or "claim" in line or "download" in line
    )
    assert counts["claimant"] == len(layers), (counts, logs)  # configs are never claimed
    assert counts["inflight_hits"] >= (len(nodes) - 1) * len(layers) // 2, (counts, logs)


def test_two_nodes_pull_at_once_each_layer_leaves_upstream_once(c: Cluster, tmp_path: Path) -> None:
    _burst(c, [c.node(1), c.node(2)], tmp_path)


def test_three_nodes_pull_at_once_each_layer_leaves_upstream_once(
    c: Cluster, tmp_path: Path
) -> None:
    _burst(c, c.nodes, tmp_path)


def _claimants(nodes: list[Node], before: dict[str, int]) -> list[Node]:
    out = []
    for n in nodes:
        for (name, labels), value in ag.metrics(n).items():
            if name == "spegla_claim_outcomes_total" and dict(labels)["outcome"] == "claimant":
                if value > before.get(n.name, 0):
                    out.append(n)
    return out


def test_claimant_containerd_killed_mid_download_the_others_finish_intact(
    c: Cluster, tmp_path: Path
) -> None:
    """Three nodes pull at once; the first claimant's containerd dies while it downloads (the
    others are streaming from its download or waiting for it).  The others still finish, with
    content matching the digests: the protocol falls back (another source, another claim, or
    upstream) within bounded waits."""
    img, ref = _fresh(c, tmp_path)
    nodes = c.nodes
    before = {
        n.name: int(
            sum(
                v
                for (name, labels), v in ag.metrics(n).items()
                if name == "spegla_claim_outcomes_total" and dict(labels)["outcome"] == "claimant"
            )
        )
        for n in nodes
    }
    results: dict[str, PullResult | BaseException] = {}
    killed: list[Node] = []
    c.limit_upstream(8)  # 8 MiB take ~8 s: time to kill in the middle
    try:
        puller = threading.Thread(target=lambda: results.update(_pull_at_once(nodes, ref)))
        puller.start()
        deadline = time.monotonic() + 20
        while not killed and time.monotonic() < deadline:
            for n in _claimants(nodes, before):
                if ingest_bytes(n) >= 1024 * 1024:  # its download is under way
                    n.containerd.kill()
                    killed.append(n)
                    break
            time.sleep(0.05)
        puller.join(timeout=170)
    finally:
        c.unlimit_upstream()
        for n in killed:
            n.containerd.start()
        c.save()
    assert killed, "no claimant with a download under way was seen"
    others = [n for n in nodes if n not in killed]
    failed = {
        name: r
        for name, r in results.items()
        if name in {n.name for n in others} and isinstance(r, BaseException)
    }
    assert not failed, failed
    assert all(isinstance(results.get(n.name), PullResult) for n in others), results
    _assert_intact(others, img)
