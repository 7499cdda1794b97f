"""End-to-end: a node serves layers its containerd is still pulling (issue 10, items 1, 2, 5).

Two namespace nodes with real containerd and real agents; the upstream is shaped with tbf so a
pull takes seconds.  n1 starts pulling; as soon as its agent advertises the layers as in flight,
n2 pulls the same image and gets the layers from n1's growing ingest files.  Asserted on the
upstream's access log (which node fetched which blob), the agents' counters and the bytes on disk.
"""

from __future__ import annotations

import hashlib
import http.client
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from agent.containerd.client import open_containerd
from agent.containerd.content_store import ContainerdContentStore
from tests.e2e.shared import Pull, assert_intact, cluster_with_agents, counter
from tests.harness import agents as ag
from tests.harness import nsexec
from tests.harness.cluster import UPSTREAM_HOST, Cluster, Node
from tests.harness.containerd import Line
from tests.harness.images import MIB, BuiltImage, _single

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def c(containerd_line: Line) -> Iterator[Cluster]:
    with cluster_with_agents("spg-infl-", nodes=2, large_mib=1, line=containerd_line) as cl:
        yield cl


def one_layer_image(tmp_path: Path, tag: str) -> BuiltImage:
    """One 6 MiB layer (containerd 1.6 writes an ingest in 1 MiB steps, and with two layers
    sharing a shaped link one can finish before the other has written its first step)."""
    name = f"infl-{tag}-{hashlib.sha256(str(tmp_path).encode()).hexdigest()[:8]}"
    return _single(tmp_path / "img", name, "v1", [[6 * MIB]])


def inflight_ingests(node: Node, digests: tuple[str, ...]) -> int:
    ingest = node.containerd.content_path / "ingest"
    refs = [p.read_text() for p in ingest.glob("*/ref")] if ingest.exists() else []
    return sum(1 for d in digests if any(r.endswith(d) for r in refs))


def wait_advertised_inflight(c: Cluster, holder: Node, asker: Node, img: BuiltImage) -> None:
    """Until `asker`'s agent answers a HEAD for every layer through a peer (n1 still pulling)."""
    layers = tuple(layer.digest for layer in img.for_platform().layers)
    deadline = time.monotonic() + 20
    while inflight_ingests(holder, layers) < len(layers):
        assert time.monotonic() < deadline, "the holder's downloads never began"
        time.sleep(0.02)
    pending = list(layers)
    while pending:
        assert time.monotonic() < deadline, f"{pending} never served while in flight"
        assert inflight_ingests(holder, layers) > 0, "the holder finished before the test could ask"
        url = (
            f"http://127.0.0.1:{ag.REGISTRY_PORT}/v2/e2e/{img.name}/blobs/{pending[0]}"
            f"?ns={UPSTREAM_HOST}"
        )
        try:
            status, headers, _ = nsexec.http_get(url, asker.netns, timeout=2.0, method="HEAD")
        except OSError:
            status, headers = 0, {}
        if status == 200:
            size = next(x.size for x in img.for_platform().layers if x.digest == pending[0])
            assert headers["content-length"] == str(size)  # the full size, from `total`
            pending.pop(0)
        else:
            time.sleep(0.05)


def layer_fetches(c: Cluster, node: Node, mark: int, img: BuiltImage) -> set[str]:
    layers = {layer.digest for layer in img.for_platform().layers}
    return {
        r.blob_digest or ""
        for r in c.upstream.blob_fetches(mark)
        if r.remote_ip == node.ip and r.blob_digest in layers
    }


def test_layers_stream_from_a_node_still_pulling_them_and_survive_its_commit(
    c: Cluster, tmp_path: Path
) -> None:
    """n2 gets the layer from n1's ingest while n1 pulls it; n1's link to n2 is slower
    than its upstream, so n1 commits while n2 is still reading (the hand-over to the committed
    file).  The upstream serves the layer once, to n1."""
    img = one_layer_image(tmp_path, "a")
    ref = c.upstream.push(img)
    n1, n2 = c.node(1), c.node(2)
    inflight_before = counter(n2, "spegel_mirror_requests_total", cache="inflight")
    mark = c.upstream.mark()
    c.limit_upstream(16)  # 6 MiB: ~3 s for n1
    c.limit_node(n1, 6)  # what n1 serves n2: ~8 s
    try:
        first = Pull(n1, ref)
        wait_advertised_inflight(c, n1, n2, img)
        second = Pull(n2, ref)
        first.join(60)
        second.join(90)
    finally:
        c.unlimit_upstream()
        c.limit_node(n1, None)
    assert first.error is None and second.error is None, (first.error, second.error)
    assert second.result is not None
    assert second.result.image_id == img.for_platform().config.digest
    assert first.ended < second.ended - 1.0  # n1 committed while n2 still streamed
    assert_intact(n2, img)
    assert layer_fetches(c, n2, mark, img) == set()  # the layer came from n1's ingest
    assert layer_fetches(c, n1, mark, img) == {x.digest for x in img.for_platform().layers}
    assert counter(n2, "spegel_mirror_requests_total", cache="inflight") >= inflight_before + 1


def test_provider_agent_killed_mid_stream_the_pull_still_completes(
    c: Cluster, tmp_path: Path
) -> None:
    """n2 streams from n1's ingests; n1's agent is killed mid-stream and comes back (as a
    DaemonSet restarts it).  n2's agent, with part of the body already sent (a cut body would fail
    containerd 1.6's whole pull), keeps looking for a provider and resumes from the restarted
    agent; the pull completes intact."""
    img = one_layer_image(tmp_path, "k")
    ref = c.upstream.push(img)
    n1, n2 = c.node(1), c.node(2)
    mark = c.upstream.mark()
    c.limit_upstream(4)  # n1 needs ~12 s: the layer is still in flight when its agent dies
    c.limit_node(n1, 4)
    killed = False
    try:
        first = Pull(n1, ref)
        wait_advertised_inflight(c, n1, n2, img)
        second = Pull(n2, ref)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and second.is_alive():
            if n1 in ag.serving_peers(c, n2, sending=True):
                n1.processes["agent"].kill()
                killed = True
                ag.start_agent(c, n1)
                break
            time.sleep(0.05)
        first.join(60)
        second.join(90)
    finally:
        c.unlimit_upstream()
        c.limit_node(n1, None)
        if "agent" in n1.processes and not n1.processes["agent"].alive():
            ag.start_agent(c, n1)
    assert killed, "no transfer from n1 was seen to kill"
    assert first.error is None and second.error is None, (first.error, second.error)
    assert_intact(n2, img)
    assert layer_fetches(c, n2, mark, img) == set()  # resumed from the restarted agent
    messages = [r.get("msg", "") for r in ag.agent_log(n2)]
    assert "mirror stream resumed after waiting for a provider" in messages


def test_a_download_fed_bad_bytes_is_aborted_in_containerd(c: Cluster, tmp_path: Path) -> None:
    """What the mirror does after streaming bytes that failed their digest: it aborts this
    node's containerd download of the blob (gRPC Content.Abort), so the retry starts afresh
    instead of resuming from a bad prefix.  Checked against n1's real, running download."""
    img = one_layer_image(tmp_path, "d")
    ref = c.upstream.push(img)
    n1 = c.node(1)
    layer = img.for_platform().layers[0].digest
    c.limit_upstream(4)  # ~12 s: time to abort it mid-way
    try:
        pull = Pull(n1, ref)
        deadline = time.monotonic() + 20
        while inflight_ingests(n1, (layer,)) == 0:
            assert time.monotonic() < deadline, "the download never began"
            time.sleep(0.02)
        trio.run(discard, n1, layer)
        pull.join(60)
    finally:
        c.unlimit_upstream()
    assert pull.error is not None  # that pull failed; kubelet's retry downloads afresh
    assert inflight_ingests(n1, (layer,)) == 0
    assert not n1.containerd.has_blob(layer)
    assert n1.pull(ref).image_id == img.for_platform().config.digest  # the retry
    assert_intact(n1, img)


async def discard(node: Node, digest: str) -> None:
    async with open_containerd(str(node.containerd.socket), "k8s.io") as client:
        await ContainerdContentStore(client).discard_download(digest)


class PeerRead(threading.Thread):
    """A peer's GET of a blob from `holder`'s agent (made from `asker`'s namespace), read in
    chunks; `got` grows as bytes arrive, `short` says the body ended before its length."""

    def __init__(self, asker: Node, holder: Node, img: BuiltImage, digest: str) -> None:
        super().__init__(daemon=True)
        self.asker, self.holder, self.img, self.digest = asker, holder, img, digest
        self.got = bytearray()
        self.length = -1
        self.short: bool | None = None
        self.ended = 0.0

    def run(self) -> None:
        nsexec.call_in_netns(self.asker.netns, self._read)
        self.ended = time.monotonic()

    def _read(self) -> None:
        conn = http.client.HTTPConnection(self.holder.ip, ag.REGISTRY_PORT, timeout=30)
        try:
            path = f"/v2/e2e/{self.img.name}/blobs/{self.digest}?ns={UPSTREAM_HOST}"
            conn.request("GET", path, headers={"X-Spegel-Mirrored": "true"})
            resp = conn.getresponse()
            self.length = int(resp.getheader("content-length") or -1)
            try:
                while chunk := resp.read1(64 * 1024):
                    self.got += chunk
                self.short = len(self.got) < self.length
            except http.client.IncompleteRead as e:
                self.got += e.partial
                self.short = True
        except (OSError, http.client.HTTPException):
            self.short = True
        finally:
            conn.close()


def test_an_aborted_download_cuts_the_peer_stream_at_once(c: Cluster, tmp_path: Path) -> None:
    """A peer reads n1's layer while n1's containerd still downloads it; the download is then
    aborted in containerd (its data file removed, as a failed pull's lease GC or a restart
    does).  The body ends short at once (not after the stall bound), and what arrived is a true
    prefix of the layer."""
    img = one_layer_image(tmp_path, "x")
    ref = c.upstream.push(img)
    n1, n2 = c.node(1), c.node(2)
    layer = img.for_platform().layers[0].digest
    c.limit_upstream(4)  # ~12 s
    try:
        pull = Pull(n1, ref)
        deadline = time.monotonic() + 20
        while inflight_ingests(n1, (layer,)) == 0 or not _advertised(n1, layer):
            assert time.monotonic() < deadline, "the download never began"
            time.sleep(0.05)
        reader = PeerRead(n2, n1, img, layer)
        reader.start()
        while len(reader.got) < 512 * 1024:
            assert time.monotonic() < deadline and reader.is_alive(), "no bytes streamed"
            time.sleep(0.02)
        aborted_at = time.monotonic()
        trio.run(discard, n1, layer)
        reader.join(15)
        pull.join(60)
    finally:
        c.unlimit_upstream()
    assert reader.short is True and 0 < len(reader.got) < reader.length
    assert reader.ended - aborted_at < 5.0  # cut at once, not after the 10 s stall bound
    full = (img.path / "blobs" / "sha256" / layer.removeprefix("sha256:")).read_bytes()
    assert bytes(reader.got) == full[: len(reader.got)]
    assert pull.error is not None


def _advertised(node: Node, digest: str) -> bool:
    return counter(node, "spegla_inflight_ingests") >= 1
