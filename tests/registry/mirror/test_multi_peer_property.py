"""Property tests of one blob fetched from several peers at once: random piece sizes, peers cut
off, slow, frozen mid-range and lying, against in-memory peers (MockClock: no real waiting).

Properties: the client gets exactly its slice of the blob whenever the bytes used were true;
otherwise the response is cut short before its last byte and exactly the lying peer is
quarantined (never an honest one); the reorder window bounds the buffers in use; every pooled
buffer goes back.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import trio
import trio.testing
from hypothesis import event, given, settings
from hypothesis import strategies as st

from registry.mirror.buffers import Chunk
from registry.mirror.job import MirrorAbort, MirrorHead, MirrorItem, MirrorJob, MirrorSettings
from registry.mirror.range_plan import RangePlan
from registry.oci.distribution import ContentKind, ContentRequest
from registry.oci.ranges import RangeSpec
from registry.oci.reference import Reference
from tests.registry.memory_peers import FakePeer, forwarder_over

BUFFER = 4096


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
    forwarder = forwarder_over(
        digest,
        peers,
        MirrorSettings(
            resolve_retries=2 * len(peers) + 1,
            verify_first_max=0,  # stream (the case where lies cut the response short)
            buffer_size=BUFFER,
            stream_buffer_size=2 * BUFFER,  # a single-peer fallback streams in 2-unit buffers
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
    honest = {("127.0.0.1", i + 1) for i in range(len(peers)) if i not in liars}  # ports 1, 2, ..
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
