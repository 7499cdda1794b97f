"""What the namespace-cluster e2e modules share: a cluster with an agent on every node, the check
that a node's copy of an image is intact, and which blobs a node took from the upstream.

Why: each e2e module had its own copy of these; one copy keeps their meaning the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Iterator, Sequence

from tests.harness import agents as ag
from tests.harness.cluster import UPSTREAM_HOST, Cluster, Node, PullResult
from tests.harness.containerd import LINE_1_6, Line
from tests.harness.fixtures import require_line, short_tempdir
from tests.harness.images import BuiltImage


@contextlib.contextmanager
def cluster_with_agents(
    prefix: str, nodes: int, large_mib: int, extra: Sequence[str] = (), line: Line = LINE_1_6
) -> Iterator[Cluster]:
    """A namespace cluster of `nodes` on containerd `line` (skipped where the harness cannot run),
    an agent started on each (with `extra` flags); torn down on exit."""
    require_line(line)
    cl = Cluster(short_tempdir(prefix), nodes=nodes, line=line)
    try:
        cl.up(large_mib=large_mib)
        ag.start_agents(cl, extra=extra)
        yield cl
    finally:
        cl.down()


def assert_intact(node: Node, img: BuiltImage) -> None:
    """Every blob of `img` in `node`'s content store matches its digest."""
    for digest in img.blob_digests():
        data = node.containerd.blob_path(digest).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest, (node.name, digest)


class Pull(threading.Thread):
    """A CRI pull of `ref` on `node` in a thread, started at once; when it ends: `result` or
    `error`, and `ended` (monotonic)."""

    def __init__(self, node: Node, ref: str, timeout: float = 120.0) -> None:
        super().__init__(daemon=True)
        self.node, self.ref, self.timeout = node, ref, timeout
        self.result: PullResult | None = None
        self.error: BaseException | None = None
        self.ended = 0.0
        self.start()

    def run(self) -> None:
        try:
            self.result = self.node.pull(self.ref, timeout=self.timeout)
        except BaseException as e:  # reported by the test
            self.error = e
        self.ended = time.monotonic()

    def wait(self, timeout: float = 150.0) -> str | None:
        """None if the pull succeeded, else its error text."""
        self.join(timeout)
        assert not self.is_alive(), "pull hung"
        return None if self.error is None else str(self.error)[:200]


def ingest_bytes(node: Node) -> int:
    """Bytes in `node`'s containerd downloads still in progress (its ingests' data files)."""
    ingest = node.containerd.content_path / "ingest"
    return sum(p.stat().st_size for p in ingest.glob("*/data")) if ingest.exists() else 0


def counter(node: Node, name: str, **labels: str) -> float:
    """The sum of metric `name` over the samples of `node`'s agent that carry `labels`."""
    total = 0.0
    for (metric, have), value in ag.metrics(node).items():
        if metric == name and all(dict(have).get(k) == v for k, v in labels.items()):
            total += value
    return total


def upstream_blobs(c: Cluster, node: Node, mark: int) -> set[str]:
    """The blob digests `node` fetched from the upstream since `mark`."""
    return {r.blob_digest or "" for r in c.upstream.blob_fetches(mark) if r.remote_ip == node.ip}


def own_agent_blob_url(name: str, digest: str) -> str:
    """A blob of image `e2e/<name>` at the node's own agent, asked the way containerd asks it
    (from inside the node's namespace)."""
    return f"http://127.0.0.1:{ag.REGISTRY_PORT}/v2/e2e/{name}/blobs/{digest}?ns={UPSTREAM_HOST}"


def wait_served_by_peer(
    node: Node,
    repo: str,
    digests: tuple[str, ...],
    timeout: float = 15.0,
    headers: dict[str, str] | None = None,
) -> None:
    """Poll ``node``'s own agent (from inside its namespace) until it can serve every digest from
    a peer: advertising is asynchronous, so tests wait for it instead of sleeping."""
    deadline = time.monotonic() + timeout
    pending = list(digests)
    while pending:
        d = pending[0]
        url = own_agent_blob_url(repo.removeprefix("e2e/"), d)
        try:
            status = node.http_get(url, headers=headers, timeout=2.0)[0]
        except OSError:
            status = 0
        if status == 200:
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            raise AssertionError(f"{node.name}: {d} not served through a peer after {timeout}s")
        time.sleep(0.1)
