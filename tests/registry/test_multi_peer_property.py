"""Property tests of one blob fetched from several peers at once: random piece sizes, peers cut
off, slow, frozen mid-range and lying, against in-memory peers (MockClock: no real waiting).

Properties: the client gets exactly its slice of the blob whenever the bytes used were true;
otherwise the response is cut short before its last byte and exactly the lying peer is
quarantined (never an honest one); the reorder window bounds the buffers in use; every pooled
buffer goes back.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio
import trio.testing
from hypothesis import event, given, settings
from hypothesis import strategies as st

from registry.buffers import Chunk
from registry.distribution import ContentKind, ContentRequest
from registry.forwarder import Forwarder
from registry.interfaces import Peer
from registry.mirror_job import MirrorAbort, MirrorHead, MirrorItem, MirrorJob, MirrorSettings
from registry.peer_client import PeerError
from registry.range_plan import RangePlan
from registry.ranges import RangeSpec, parse_range
from registry.reference import Reference
from tests.fakes import MemoryNetwork, MemoryRouter

BUFFER = 4096


@dataclass
class FakePeer:
    data: bytes  # what it serves (differs from the blob: a liar)
    chunk: int  # bytes per receive
    delay: float = 0.0  # seconds per receive (slow)
    cut_at: int | None = None  # absolute offset where its streams break
    frozen_at: int | None = None  # absolute offset where its streams stop sending for good
    ranges: list[tuple[int, int]] = field(default_factory=list)  # requests it answered

    @property
    def lies(self) -> bool:
        return False


class FakeResponse:
    def __init__(self, peer: FakePeer, start: int, end: int, digest: str, ranged: bool) -> None:
        self.status = 206 if ranged else 200
        self.headers = {
            "content-type": "application/octet-stream",
            "docker-content-digest": digest,
            "content-length": str(end - start + 1),
        }
        if ranged:
            self.headers["content-range"] = f"bytes {start}-{end}/{len(peer.data)}"
        self._peer, self._pos, self._end = peer, start, end + 1

    async def receive_into(self, view: memoryview) -> int:
        peer = self._peer
        if peer.delay:
            await trio.sleep(peer.delay)
        else:
            await trio.lowlevel.checkpoint()
        if self._pos >= self._end:
            return 0
        if peer.frozen_at is not None and self._pos >= peer.frozen_at:
            await trio.sleep_forever()
        if peer.cut_at is not None and self._pos >= peer.cut_at:
            raise PeerError("cut")
        stop = min(self._end, self._pos + peer.chunk, self._pos + len(view))
        for limit in (peer.cut_at, peer.frozen_at):
            if limit is not None and limit > self._pos:
                stop = min(stop, limit)
        n = stop - self._pos
        view[:n] = peer.data[self._pos : stop]
        self._pos = stop
        return n

    async def receive(self) -> bytes | None:
        buffer = bytearray(1 << 16)
        n = await self.receive_into(memoryview(buffer))
        return bytes(buffer[:n]) if n else None


class FakeClient:
    def __init__(self, peers: dict[int, FakePeer], digest: str) -> None:
        self.peers, self.digest = peers, digest

    @asynccontextmanager
    async def request(
        self, host: str, port: int, method: str, target: str, headers: list[tuple[str, str]]
    ) -> AsyncIterator[FakeResponse]:
        peer = self.peers[port]
        size = len(peer.data)
        ranged = dict(headers).get("Range")
        start, end = 0, size - 1
        if ranged:
            r = parse_range(ranged).resolve(size)
            start, end = r.start, r.end
        peer.ranges.append((start, end))
        yield FakeResponse(peer, start, end, self.digest, ranged is not None)


@dataclass
class Outcome:
    head: MirrorItem
    body: bytes
    aborted: bool
    quarantined: frozenset[tuple[str, int]]
    peak_buffers: int


async def mirror(
    blob: bytes, peers: list[FakePeer], client_range: RangeSpec | None, piece: int, window: int
) -> Outcome:
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    network = MemoryNetwork()
    for port in range(len(peers)):
        network.add(digest, Peer(bytes([port + 1]) * 32, "127.0.0.1", port))
    forwarder = Forwarder(
        MemoryRouter(network),
        FakeClient(dict(enumerate(peers)), digest),  # type: ignore[arg-type]
        MirrorSettings(
            resolve_retries=2 * len(peers) + 1,
            verify_first_max=0,  # stream (the case where lies cut the response short)
            buffer_size=BUFFER,
            multi_peer_min=1,
            multi_peer_max=window // 2,
            multi_peer_piece=piece,
            multi_peer_slow_after=1.0,
            stall_timeout=5.0,
        ),
    )
    request = ContentRequest(ContentKind.BLOB, Reference("docker.io", "a", digest=digest))
    send, receive = trio.open_memory_channel[MirrorItem](0)
    body, aborted = bytearray(), False
    # a livelock (virtual time running on forever) must fail, not hang
    with trio.fail_after(3600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(forwarder.run, MirrorJob(request, "GET", client_range), send)
            async with receive:
                head = await receive.receive()
                async for item in receive:
                    assert not aborted, "nothing may follow an abort"
                    if isinstance(item, MirrorAbort):
                        aborted = True
                    elif isinstance(item, Chunk):
                        with item.view() as view:
                            body += view
                        item.release()
                    else:
                        assert isinstance(item, bytes | bytearray)
                        body += item
    assert forwarder.buffers.in_use == 0, "every pooled buffer went back"
    return Outcome(
        head,
        bytes(body),
        aborted,
        forwarder.quarantine.peers(digest),
        forwarder.buffers.peak_in_use,
    )


@st.composite
def scenarios(
    draw: st.DrawFn,
) -> tuple[bytes, list[FakePeer], RangeSpec | None, int, int, set[int]]:
    size = draw(st.integers(1, 12 * BUFFER))
    salt = draw(st.integers(0, 255))
    blob = bytes(salt ^ (i * 7 % 251) for i in range(size))
    piece = BUFFER * draw(st.integers(1, 3))
    n = draw(st.integers(2, 4))
    peers: list[FakePeer] = []
    liars: set[int] = set()
    honest_full = draw(st.integers(0, n - 1))  # one peer serves everything truly (maybe slowly)
    for i in range(n):
        data = bytearray(blob)
        peer = FakePeer(bytes(data), draw(st.integers(256, 3 * BUFFER)))
        if i != honest_full:
            kind = draw(st.sampled_from(["fast", "slow", "cut", "frozen", "liar"]))
            if kind == "slow":
                peer.delay = draw(st.sampled_from([0.01, 0.3, 2.0]))
            elif kind == "cut":
                peer.cut_at = draw(st.integers(0, size))
            elif kind == "frozen":
                peer.frozen_at = draw(st.integers(0, size - 1))
            elif kind == "liar":
                at = draw(st.integers(0, size - 1))
                data[at] ^= 0x01
                peer.data = bytes(data)
                liars.add(i)
            event(kind)
        elif draw(st.booleans()):
            peer.delay = 0.05
        peers.append(peer)
    client_range = None
    if draw(st.booleans()):
        first = draw(st.integers(0, size - 1))
        client_range = RangeSpec(first, draw(st.one_of(st.none(), st.integers(first, size + 5))))
    window = 2 * draw(st.integers(2, 4))
    return blob, peers, client_range, piece, window, liars


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_multi_peer_blobs_arrive_whole_or_cut_short_with_the_liar_found(
    scenario: tuple[bytes, list[FakePeer], RangeSpec | None, int, int, set[int]],
) -> None:
    blob, peers, client_range, piece, window, liars = scenario
    clock = trio.testing.MockClock(autojump_threshold=0)
    outcome = trio.run(mirror, blob, peers, client_range, piece, window, clock=clock)
    ranged = sum(1 for p in peers if len(p.ranges) > 1 or (p.ranges and p.ranges[0][0] > 0))
    event(f"peers asked for ranges: {ranged}")
    assert isinstance(outcome.head, MirrorHead)
    expected = expected_slice(blob, client_range)
    honest = {("127.0.0.1", i) for i in range(len(peers)) if i not in liars}
    assert not (outcome.quarantined & honest), "an honest peer was quarantined"
    if outcome.aborted:
        event("aborted")
        assert liars, "only a lie cuts a response short here"
        assert len(outcome.body) < len(expected)
        assert len(outcome.quarantined) == 1, "exactly the liar whose span did not fit"
    else:
        event("complete")
        assert outcome.body == expected
    # memory: the reorder window (plus the head's buffers in flight) bounds what is held
    pieces_per_window = window * (piece // BUFFER)
    assert outcome.peak_buffers <= pieces_per_window + 2 * piece // BUFFER + 4


def expected_slice(blob: bytes, client_range: RangeSpec | None) -> bytes:
    if client_range is None:
        return blob
    r = client_range.resolve(len(blob))
    return blob[r.start : r.end + 1]


def test_plan_hands_out_pieces_inside_the_window_and_takes_back_a_stalled_head() -> None:
    plan = RangePlan(10 * 4, 4, window=3)
    a, b, c = ("a", 1), ("b", 2), ("c", 3)
    first, second, third = plan.assign(a, 0.0), plan.assign(b, 0.0), plan.assign(c, 0.0)
    assert (first and first.index, second and second.index, third and third.index) == (0, 1, 2)
    assert plan.assign(a, 0.0) is None  # the window is full
    assert second is not None and first is not None
    plan.received(second, b, 4, 0.5)
    assert plan.go_on(b, second, 0.5) is None  # piece 2 is taken; 3 is outside the window
    plan.received(first, a, 1, 0.1)
    assert plan.stalled_head(1.0, 1.0) is None
    assert plan.stalled_head(1.2, 1.0) is first
    plan.stopped(first, a, slow=True)
    assert plan.assign(a, 1.2) is None  # not given back to the slow peer
    again = plan.assign(b, 1.2)
    assert again is first and again.offset == 1  # continues where the slow one stopped
    plan.received(first, b, 3, 1.3)
    plan.passed_on(first)
    assert [(s.peer, s.start, s.end) for s in plan.spans()] == [(a, 0, 1), (b, 1, 8)]
