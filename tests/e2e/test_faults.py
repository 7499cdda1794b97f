"""Fault suite on real containerd in namespaces (issue 12, item 5).

Each case breaks something while a pull or serving is under way: the node's own agent SIGKILLed
mid-transfer, the serving peer frozen with SIGSTOP, containerd restarted under request load, a
non-agent flooding the DHT port with datagrams, the node's content directory full while serving.
In each: the pull completes or fails cleanly (a failed pull completes when retried), no content
is corrupt, and the agent recovers without being restarted (same process).  A serving peer killed
mid-transfer is `test_agents_e2e.test_peer_killed_mid_transfer_pull_still_succeeds`.

Each case prints one `FAULT <case>: <outcome>` line (run with -s to see them).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
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
from tests.harness.cluster import Cluster, Node
from tests.harness.containerd import Line
from tests.harness.fixtures import on_one_line
from tests.harness.images import BuiltImage, build_large, build_small

pytestmark = [pytest.mark.root, pytest.mark.slow]
Push = Callable[..., tuple[BuiltImage, str]]


@pytest.fixture(scope="module")
def c(containerd_line: Line) -> Iterator[Cluster]:
    with cluster_with_agents("spg-fault-", nodes=3, large_mib=1, line=containerd_line) as cl:
        yield cl


@pytest.fixture
def push(c: Cluster, tmp_path: Path) -> Push:
    """Build and push an image nobody holds yet: `push("small" | "large")` -> (image, ref)."""
    counter = iter(range(100))

    def make(kind: str = "small") -> tuple[BuiltImage, str]:
        tag = hashlib.sha256(str(tmp_path).encode()).hexdigest()[:8]
        name = f"fault-{kind}-{tag}-{next(counter)}"
        if kind == "large":
            img = build_large(tmp_path / "img", 8, name=name)
        else:
            img = build_small(tmp_path / "img", name=name)
        return img, c.upstream.push(img)

    return make


def report(case: str, outcome: str) -> None:
    print(f"FAULT {case}: {outcome}")


def assert_store_not_corrupt(node: Node) -> None:
    """Every committed blob in the node's content store matches its name."""
    blobs = node.containerd.content_path / "blobs" / "sha256"
    for path in blobs.iterdir() if blobs.exists() else ():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name, path


def wait_served(node: Node, img: BuiltImage, timeout: float = 30.0) -> None:
    """Until `node`'s own agent serves every blob of `img` (locally or from a peer)."""
    deadline = time.monotonic() + timeout
    for digest in img.blob_digests():
        while True:
            try:
                status, _, body = node.http_get(own_agent_blob_url(img.name, digest), timeout=5.0)
            except OSError:
                status, body = 0, b""
            if status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == digest:
                break
            assert time.monotonic() < deadline, f"{node.name}: {digest} not served ({status})"
            time.sleep(0.2)


def mirror_lines(node: Node) -> list[str]:
    """The agent's mirror outcome lines that were not plain hits (for failure messages)."""
    lines = []
    for r in ag.agent_log(node):
        if r.get("reason") or r.get("cache") == "miss":
            lines.append(f"{r.get('msg')} peer={r.get('peer')} bytes={r.get('bytes')}")
    return lines[-20:]


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def agent_pid(node: Node) -> int:
    return node.processes["agent"].pid


# -- the cases ----------------------------------------------------------------------------------


@on_one_line  # containerd only sees a mirror die: its own side is the same on both lines
def test_own_agent_sigkilled_mid_transfer(c: Cluster, push: Push) -> None:
    """n2 pulls through its own agent from n1 (slowed link); n2's agent is SIGKILLed while the
    bytes flow.  containerd completes from upstream (now or on the retry); content is intact;
    the restarted agent serves again."""
    img, ref = push("large")
    n1, n2 = c.node(1), c.node(2)
    n1.pull(ref)
    wait_served(n2, img)  # n2's agent knows n1 holds it
    c.limit_node(n1, 8)  # 8 MiB at 8 Mbit/s: several seconds
    mark = c.upstream.mark()
    try:
        pull = Pull(n2, ref)
        wait_until(
            lambda: n1 in ag.serving_peers(c, n2, sending=True) or not pull.is_alive(),
            20,
            "a transfer from n1 to n2",
        )
        os.kill(agent_pid(n2), signal.SIGKILL)
        first = pull.wait()
    finally:
        c.limit_node(n1, None)
    retried = None
    if first is not None:
        retried = Pull(n2, ref).wait()  # agent down: containerd goes upstream
    assert retried is None, retried
    assert_intact(n2, img)
    assert_store_not_corrupt(n2)
    ag.start_agent(c, n2)
    wait_served(n2, img)
    upstream = len(upstream_blobs(c, n2, mark))
    report(
        "own agent SIGKILLed mid-transfer",
        ("pull completed" if first is None else f"pull failed cleanly ({first}); retry completed")
        + f", {upstream} of {len(img.blob_digests())} blobs from upstream; restarted agent serves",
    )


@on_one_line  # a frozen peer is the agents' failover, not containerd's
def test_serving_peer_frozen_with_sigstop(c: Cluster, push: Push) -> None:
    """n1 and n3 hold the image (slowed links); the peer serving n2 is frozen with SIGSTOP.
    n2's pull completes (another peer or upstream), intact; after SIGCONT the frozen agent
    serves again, same process."""
    img, ref = push("large")
    n1, n2, n3 = c.node(1), c.node(2), c.node(3)
    n1.pull(ref)
    n3.pull(ref)
    wait_served(n2, img)
    for n in (n1, n3):
        c.limit_node(n, 8)
    frozen: list[Node] = []
    mark = c.upstream.mark()
    try:
        pull = Pull(n2, ref)
        deadline = time.monotonic() + 20
        while not frozen and time.monotonic() < deadline and pull.is_alive():
            serving = ag.serving_peers(c, n2, sending=True)
            if serving:
                os.kill(agent_pid(serving[0]), signal.SIGSTOP)
                frozen.append(serving[0])
            time.sleep(0.05)
        error = pull.wait()
    finally:
        for n in frozen:
            os.kill(agent_pid(n), signal.SIGCONT)
        for n in (n1, n3):
            c.limit_node(n, None)
    assert frozen, "no transfer from a peer was seen to freeze"
    if error is not None:
        error_retry = Pull(n2, ref).wait()
        assert error_retry is None, (error, error_retry, mirror_lines(n2))
    assert_intact(n2, img)
    pid = agent_pid(frozen[0])
    wait_served(frozen[0], img)
    ag.wait_ready(frozen[0], timeout=30)
    assert agent_pid(frozen[0]) == pid and frozen[0].processes["agent"].alive()
    upstream = len(upstream_blobs(c, n2, mark))
    report(
        "serving peer frozen (SIGSTOP)",
        ("pull completed" if error is None else f"pull failed cleanly ({error}); retry completed")
        + f", {upstream} of {len(img.blob_digests())} blobs from upstream; frozen agent serves",
    )


def test_containerd_restarted_under_load(c: Cluster, push: Push) -> None:
    """Clients keep GETting n1's local blobs while n1's containerd restarts: every answer is the
    right bytes or a clean 404 (never a 5xx or wrong bytes); afterwards the same agent process
    serves and advertises again."""
    img, ref = push("small")
    n1, n3 = c.node(1), c.node(3)
    n1.pull(ref)
    wait_served(n1, img)
    pid = agent_pid(n1)
    digests = img.blob_digests()
    answers: list[tuple[int, bool]] = []
    stop = threading.Event()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            digest = rng.choice(digests)
            try:
                status, _, body = n1.http_get(own_agent_blob_url(img.name, digest), timeout=10.0)
            except OSError:
                status, body = -1, b""
            right = status != 200 or "sha256:" + hashlib.sha256(body).hexdigest() == digest
            answers.append((status, right))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        n1.containerd.restart()
        c.save()
        time.sleep(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    statuses = sorted({status for status, _ in answers})
    assert answers and all(right for _, right in answers), "wrong bytes served"
    warnings = [
        f"{r.get('msg')} {r.get('error', '')}"[:300]
        for r in ag.agent_log(n1)
        if r.get("level") in ("WARNING", "ERROR")
    ][-12:]
    assert set(statuses) <= {200, 404}, (statuses, warnings)
    ag.wait_ready(n1, timeout=30)
    assert agent_pid(n1) == pid and n1.processes["agent"].alive()
    wait_served(n1, img)
    wait_served(n3, img, timeout=40)  # re-advertised: a peer is served from n1 again
    counts = {s: sum(1 for x, _ in answers if x == s) for s in statuses}
    report("containerd restarted under load", f"answers by status {counts}; agent recovered")


def _flood(target: tuple[str, int], seconds: float, limit: int) -> int:
    """Send junk datagrams to `target` for `seconds` (at most `limit`); the count sent."""
    rng = random.Random(5001)
    junk = [
        lambda: rng.randbytes(rng.randint(0, 1400)),
        lambda: msgpack.packb([rng.randint(0, 255), rng.randbytes(20), {"x": rng.random()}]),
        lambda: msgpack.packb({"t": "find_providers", "k": rng.randbytes(32), "id": 7}),
        lambda: msgpack.packb([1, 2, 3] * rng.randint(0, 200)),
    ]
    sent = 0
    deadline = time.monotonic() + seconds
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        while time.monotonic() < deadline and sent < limit:
            with contextlib.suppress(OSError):
                sock.sendto(rng.choice(junk)(), target)
                sent += 1
    return sent


@on_one_line  # DHT traffic never reaches containerd
def test_dht_flood_from_a_non_agent(c: Cluster, push: Push) -> None:
    """The upstream host (not an agent) floods n1's DHT port with junk datagrams while n2 pulls
    what n1 holds: the pull completes intact; n1's agent (same process) still serves peers."""
    img, ref = push("small")
    n1, n2, n3 = c.node(1), c.node(2), c.node(3)
    n1.pull(ref)
    pid = agent_pid(n1)
    box: dict[str, int] = {}

    def flood() -> None:
        target = (n1.ip, ag.ROUTER_PORT)
        box["sent"] = nsexec.call_in_netns(c.topology.upstream, _flood, target, 8.0, 200_000)

    flooder = threading.Thread(target=flood)
    mark = c.upstream.mark()
    flooder.start()
    try:
        time.sleep(1.0)
        error = Pull(n2, ref).wait()
    finally:
        flooder.join(30)
    assert error is None, error
    assert_intact(n2, img)
    assert agent_pid(n1) == pid and n1.processes["agent"].alive()
    ag.wait_ready(n1, timeout=30)
    wait_served(n3, img, timeout=40)  # n1 still answers DHT lookups and serves peers
    upstream = len(upstream_blobs(c, n2, mark))
    report(
        "DHT flood from a non-agent",
        f"{box.get('sent', 0)} junk datagrams; pull completed, {upstream} of "
        f"{len(img.blob_digests())} blobs from upstream; agent still serves peers",
    )


def test_content_directory_full_while_serving(c: Cluster, push: Push) -> None:
    """n3's content directory is a small tmpfs filled to the last byte: n3's agent keeps
    serving what it holds (n2's pull of it completes), n3's own pull of something new fails
    cleanly, nothing in the store is corrupt, and once space is back n3's pull completes."""
    held, held_ref = push("small")
    new, new_ref = push("large")
    n2, n3 = c.node(2), c.node(3)
    content = n3.containerd.content_path
    saved = content.parent / "content-saved"
    n3.containerd.stop()
    content.mkdir(exist_ok=True)  # containerd 2.x creates it only at its first pull
    content.rename(saved)
    content.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(content)], check=True)
    try:
        subprocess.run(["cp", "-a", f"{saved}/.", str(content)], check=True)
        n3.containerd.start()
        c.save()
        ag.wait_ready(n3, timeout=30)
        n3.pull(held_ref)
        wait_served(n2, held, timeout=40)
        filler = content / "filler"
        with open(filler, "wb", buffering=0) as out:
            for step in (1 << 20, 4096, 1):  # to the last byte
                with contextlib.suppress(OSError):
                    while True:
                        out.write(bytes(step))
        mark = c.upstream.mark()
        assert Pull(n2, held_ref).wait() is None
        assert_intact(n2, held)
        served_by_n3 = not upstream_blobs(c, n2, mark)
        failed = Pull(n3, new_ref, timeout=60).wait()
        assert failed is not None, "a pull into a full disk succeeded"
        assert_store_not_corrupt(n3)
        assert n3.processes["agent"].alive()
        ag.wait_ready(n3, timeout=30)
        filler.unlink()
        assert Pull(n3, new_ref).wait() is None
        assert_intact(n3, new)
        assert_store_not_corrupt(n3)
    finally:
        n3.containerd.stop()
        (content / "filler").unlink(missing_ok=True)
        subprocess.run(["cp", "-a", f"{content}/.", str(saved)], check=False)  # keep what it got
        subprocess.run(["umount", "-l", str(content)], check=False)
        content.rmdir()
        saved.rename(content)
        n3.containerd.start()
        c.save()
    report(
        "content directory full while serving",
        f"n2's pull of held content completed ({'served by n3' if served_by_n3 else 'upstream'});"
        f" n3's own pull failed cleanly ({failed}); after freeing space it completed",
    )
