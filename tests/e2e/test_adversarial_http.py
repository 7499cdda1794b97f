"""Adversarial HTTP suite on real containerd in namespaces (issue 17, items 4, 6, 7 and 9).

An attacker on the cluster network (a process in another node's namespace) tries what the
issue found: a flood of requests with invented 8 KB methods to blow up `/metrics`, a client that
never reads a blob it asked for to hold an upload slot and a file, and a fake peer answering
every request with malformed heads.  Each case asserts what the attacker sent and that it gained
nothing: `/metrics` stays small and the agent keeps serving pulls; the slot and the file are
freed after the send deadline; pulls fail over to the honest peer.  Counts and times are
bounded.

Each case prints one `ATTACK <case>: <outcome>` line (run with -s to see them).
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.shared import (
    Pull,
    assert_intact,
    cluster_with_agents,
    own_agent_blob_url,
    upstream_blobs,
)
from tests.harness import agents as ag
from tests.harness import nsexec
from tests.harness.cluster import UPSTREAM_HOST, Cluster, Node
from tests.harness.images import BuiltImage, build_large, build_small

pytestmark = [pytest.mark.root, pytest.mark.slow]

SEND_TIMEOUT = 2.0  # the agents' --send-timeout here (default 30 s), so a case takes seconds
FLOOD_REQUESTS = 2000
FLOOD_METHOD_BYTES = 8000


@pytest.fixture(scope="module")
def c() -> Iterator[Cluster]:
    extra = ["--send-timeout", f"{SEND_TIMEOUT:g}s"]
    with cluster_with_agents("spg-adv-", nodes=3, large_mib=1, extra=extra) as cl:
        yield cl


Push = Callable[..., tuple[BuiltImage, str]]


@pytest.fixture
def push(c: Cluster, tmp_path: Path) -> Push:
    """Build and push an image nobody holds yet: `push("small" | "large", mib)`."""
    counter = iter(range(100))

    def make(kind: str = "small", mib: int = 8) -> tuple[BuiltImage, str]:
        tag = hashlib.sha256(str(tmp_path).encode()).hexdigest()[:8]
        name = f"adv-{kind}-{tag}-{next(counter)}"
        if kind == "large":
            img = build_large(tmp_path / name, mib, name=name)
        else:
            img = build_small(tmp_path / name, name=name)
        return img, c.upstream.push(img)

    return make


def report(case: str, outcome: str) -> None:
    print(f"ATTACK {case}: {outcome}")


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def metrics_body(node: Node) -> bytes:
    status, _, body = node.http_get(f"http://127.0.0.1:{ag.METRICS_PORT}/metrics", timeout=30)
    assert status == 200
    return body


def gauge(node: Node, name: str) -> float:
    return sum(v for (metric, _), v in ag.metrics(node).items() if metric == name)


# -- attacker code (runs in a thread inside a namespace: its sockets are made there) --------------


def _method_flood(host: str, port: int, count: int, size: int) -> tuple[int, int, dict[int, int]]:
    """`count` requests, each with its own invented method of `size` bytes, no credentials, over
    keep-alive connections; (requests answered, bytes sent, answers by status)."""
    answered = sent = 0
    statuses: dict[int, int] = {}
    sock: socket.socket | None = None
    deadline = time.monotonic() + 120
    for i in range(count):
        if time.monotonic() > deadline:
            break
        if sock is None:
            sock = socket.create_connection((host, port), timeout=10)
        method = f"X{i:05d}".encode() + b"M" * (size - 6)
        request = method + b" /v2/ HTTP/1.1\r\nhost: registry\r\n\r\n"
        try:
            sock.sendall(request)
            sent += len(request)
            answer = b""
            while b"\r\n\r\n" not in answer:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("closed")
                answer += data
        except OSError:
            sock.close()
            sock = None
            continue
        status = int(answer.split(b" ", 2)[1])
        statuses[status] = statuses.get(status, 0) + 1
        answered += 1
        head = answer.split(b"\r\n\r\n", 1)[0].lower()
        if b"connection: close" in head or b"content-length: 0" not in head:
            sock.close()
            sock = None
    if sock is not None:
        sock.close()
    return answered, sent, statuses


def _open_and_never_read(host: str, port: int, path: str, holder: dict[str, object]) -> None:
    """GET `path` as a peer would (X-Spegel-Mirrored), with a tiny receive window, then read
    nothing until told (`holder["stop"]` set); then count what had arrived."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect((host, port))
    request = f"GET {path} HTTP/1.1\r\nhost: registry\r\nx-spegel-mirrored: true\r\n\r\n"
    sock.sendall(request.encode())
    holder["sent"] = len(request)
    stop = holder["stop"]
    assert isinstance(stop, threading.Event)
    stop.wait(60)
    received = 0
    sock.settimeout(2)
    try:
        while data := sock.recv(1 << 20):
            received += len(data)
    except OSError:
        pass
    sock.close()
    holder["received"] = received


def holders_of(node: Node, path: Path) -> int:
    """Descriptors of the file at `path` that `node`'s agent holds open."""
    pid = node.processes["agent"].pid
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                count += 1
        except OSError:
            pass
    return count


# -- the cases ----------------------------------------------------------------------------------


def test_metrics_flood_keeps_metrics_small_and_the_agent_serving(c: Cluster, push: Push) -> None:
    """From n3's namespace, 2,000 requests with distinct 8 KB methods and no credentials go to
    n1's registry port while n2 pulls what n1 holds.  Before: /metrics grew by the methods
    (hundreds of MiB).  Now: every method is the label value "other"; the pull completes from
    n1; /metrics stays within a few KiB of its size before."""
    img, ref = push("small")
    n1, n2, n3 = c.node(1), c.node(2), c.node(3)
    n1.pull(ref)
    before = metrics_body(n1)
    box: dict[str, tuple[int, int, dict[int, int]]] = {}

    def flood() -> None:
        box["flood"] = nsexec.call_in_netns(
            n3.netns, _method_flood, n1.ip, ag.REGISTRY_PORT, FLOOD_REQUESTS, FLOOD_METHOD_BYTES
        )

    flooder = threading.Thread(target=flood)
    mark = c.upstream.mark()
    flooder.start()
    try:
        time.sleep(0.5)
        error = Pull(n2, ref).wait()
    finally:
        flooder.join(150)
    assert not flooder.is_alive()
    answered, sent, statuses = box["flood"]
    assert answered == FLOOD_REQUESTS and sent >= FLOOD_REQUESTS * FLOOD_METHOD_BYTES
    assert set(statuses) == {404}  # unknown methods: 404, as Spegel answers them
    assert error is None, error
    assert_intact(n2, img)
    assert not upstream_blobs(c, n2, mark)  # served by n1 during the flood
    started = time.monotonic()
    after = metrics_body(n1)
    took = time.monotonic() - started
    assert b"MMMMMMMM" not in after
    assert len(after) - len(before) < 32 * 1024
    ag.wait_ready(n1, timeout=10)
    report(
        "metrics flood",
        f"{answered} requests, {sent >> 20} MiB of method names; /metrics {len(before)} -> "
        f"{len(after)} bytes (read in {took * 1000:.0f} ms); the pull during it came from n1",
    )


def test_a_client_that_never_reads_loses_its_slot_and_file(c: Cluster, push: Push) -> None:
    """From n3's namespace, a GET of an 8 MiB layer that n1 holds, as a peer asks it, with a
    4 KiB receive window, and then nothing read.  Before: the socket, the file and the upload
    slot were held forever.  Now: after --send-timeout n1 cuts the connection, closes the file
    and frees the slot (spegla_peer_uploads_active back to 0)."""
    img, ref = push("large", 40)  # 5 layers of 8 MiB: more than the socket buffers hold
    n1, n3 = c.node(1), c.node(3)
    n1.pull(ref)
    digest = max(img.blob_digests(), key=lambda d: n1.containerd.blob_path(d).stat().st_size)
    blob = n1.containerd.blob_path(digest)
    size = blob.stat().st_size
    assert size >= 8 << 20
    baseline_holders = holders_of(n1, blob)
    assert gauge(n1, "spegla_peer_uploads_active") == 0
    path = f"/v2/e2e/{img.name}/blobs/{digest}?ns={UPSTREAM_HOST}"
    holder: dict[str, object] = {"stop": threading.Event()}

    def slow_reader() -> None:
        nsexec.call_in_netns(n3.netns, _open_and_never_read, n1.ip, ag.REGISTRY_PORT, path, holder)

    reader = threading.Thread(target=slow_reader)
    reader.start()
    try:
        wait_until(lambda: holders_of(n1, blob) > baseline_holders, 10, "the upload to start")
        assert gauge(n1, "spegla_peer_uploads_active") == 1  # it holds a slot and the file
        held_since = time.monotonic()
        wait_until(
            lambda: (
                holders_of(n1, blob) == baseline_holders
                and gauge(n1, "spegla_peer_uploads_active") == 0
            ),
            SEND_TIMEOUT + 20,
            "the never-reading client to be cut",
        )
        held = time.monotonic() - held_since
    finally:
        stop = holder["stop"]
        assert isinstance(stop, threading.Event)
        stop.set()
        reader.join(30)
    received = holder.get("received")
    assert isinstance(received, int) and received < size  # cut, not served
    report(
        "slow reader",
        f"sent a {holder.get('sent')}-byte request, read nothing; slot and file freed "
        f"{held:.1f} s after the upload was seen (send deadline {SEND_TIMEOUT:g} s); it had "
        f"{received} of {size} bytes",
    )


def test_lying_peer_headers_fail_over_to_the_honest_peer(c: Cluster, push: Push) -> None:
    """n3's registry port answers every peer request with a malformed head (Retry-After "²",
    huge, negative or superscript Content-Length, superscript Content-Range, status 999, a wrong
    digest); n3's own agent stays on the node's loopback and advertises what n3 holds, so its
    records point peers at the liar.  n1 is honest.  n2 pulls images both hold: every pull
    completes from n1, nothing from upstream.  Before: "²" raised a ValueError that cancelled the
    race and answered 500."""
    n1, n2, n3 = c.node(1), c.node(2), c.node(3)
    liar_argv = [sys.executable, "-m", "tests.e2e.lying_peer", "--listen", f"{n3.ip}:5000"]
    ag.stop_agent(c, n3)
    ag.start_agent(c, n3, extra=["--send-timeout", "2s", "--registry-addr", "127.0.0.1:5000"])
    c.start_on_node(n3, "liar", liar_argv)
    try:
        lies = 0
        pulled = []
        for _ in range(3):  # the order providers are asked in is not ours to choose: a few images
            img, ref = push("small")
            n1.pull(ref)
            n3.pull(ref)
            wait_until(functools.partial(_served_via_peers, n2, img), 40, "its records")
            mark = c.upstream.mark()
            error = Pull(n2, ref).wait()
            assert error is None, error
            assert_intact(n2, img)
            assert not upstream_blobs(c, n2, mark), "a lie was not failed over to n1"
            pulled.append(img.name)
            lies = _lies_told(n3)
            if lies:
                break
        assert lies > 0, "the liar was never asked"
    finally:
        c.stop_on_node(n3, "liar")
        ag.stop_agent(c, n3)
        ag.start_agent(c, n3, extra=["--send-timeout", f"{SEND_TIMEOUT:g}s"])
    report(
        "lying peer headers",
        f"{lies} malformed heads told to n2; {len(pulled)} pull(s) completed from n1, "
        "0 blobs from upstream, no 500",
    )


def _served_via_peers(node: Node, img: BuiltImage) -> bool:
    """Whether `node`'s agent can serve every blob of `img` from a peer (n1, after the liar)."""
    for digest in img.blob_digests():
        url = own_agent_blob_url(img.name, digest)
        try:
            status, _, body = node.http_get(url, timeout=10.0)
        except OSError:
            return False
        if status != 200 or "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            return False
    return True


def _lies_told(node: Node) -> int:
    daemon = node.processes.get("liar")
    text = daemon.log_text() if daemon is not None else ""
    return sum(1 for line in text.splitlines() if line.startswith("LIE "))
