"""Property tests of the blob mirror loop: resumes across peers cut off at random points, client
ranges, and lying peers, against an in-memory peer client (no sockets, so many cases run fast).

Properties: when every byte served is true, the client gets exactly its slice of the blob; when a
peer lied about bytes that were served, the response is aborted and the client never receives
its last byte; either way nothing after an abort is sent.
"""

from __future__ import annotations

import hashlib
import mmap

import trio
import trio.testing
from hypothesis import event, given, settings
from hypothesis import strategies as st

from registry.mirror.buffers import Chunk
from registry.mirror.job import (
    MIRROR_DEFAULTS,
    MirrorAbort,
    MirrorFailure,
    MirrorHead,
    MirrorItem,
    MirrorJob,
    MirrorSettings,
)
from registry.oci.distribution import ContentKind, ContentRequest
from registry.oci.ranges import RangeSpec
from registry.oci.reference import Reference
from tests.registry.memory_peers import FakePeer, forwarder_over


async def mirror(
    blob: bytes,
    peers: list[FakePeer],
    client_range: RangeSpec | None,
    verify_first_max: int,
    buffer_size: int = MIRROR_DEFAULTS.buffer_size,
    acquired: list[int] | None = None,
) -> tuple[MirrorItem, bytes, bool]:
    """The forwarder's items for one GET; `acquired` collects the units of each pooled buffer
    taken (blobs bigger than verify_first_max stream in buffers of stream_buffer_size)."""
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    forwarder = forwarder_over(
        digest,
        peers,
        MirrorSettings(
            resolve_retries=len(peers) + 1,
            verify_first_max=verify_first_max,
            buffer_size=buffer_size,
            stream_buffer_size=2 * buffer_size,
        ),
    )
    if acquired is not None:
        pool, acquire = forwarder.buffers, forwarder.buffers.acquire

        async def recording(units: int = 1) -> mmap.mmap:
            acquired.append(units)
            return await acquire(units)

        pool.acquire = recording  # type: ignore[method-assign]
    request = ContentRequest(ContentKind.BLOB, Reference("docker.io", "a", digest=digest))
    send, receive = trio.open_memory_channel[MirrorItem](0)
    body, aborted = bytearray(), False
    async with trio.open_nursery() as nursery:
        nursery.start_soon(forwarder.run, MirrorJob(request, "GET", client_range), send)
        async with receive:
            head = await receive.receive()
            async for item in receive:
                assert not aborted, "nothing may follow an abort"
                if isinstance(item, MirrorAbort):
                    aborted = True
                else:
                    if isinstance(item, Chunk):
                        with item.view() as view:
                            body += view
                        item.release()
                    else:
                        assert isinstance(item, bytes | bytearray)
                        body += item
    assert forwarder.buffers.in_use == 0, "every pooled buffer went back"
    return head, bytes(body), aborted


@st.composite
def scenarios(
    draw: st.DrawFn, max_size: int = 3000
) -> tuple[bytes, list[FakePeer], RangeSpec | None, bool]:
    size = draw(st.integers(1, max_size))
    blob = draw(st.binary(min_size=size, max_size=size))
    n = draw(st.integers(1, 3))
    peers = []
    lied = False
    for i in range(n):
        data = bytearray(blob)
        if draw(st.booleans()) and draw(st.booleans()):
            data[draw(st.integers(0, size - 1))] ^= 0x01
            lied = True
        last = i == n - 1
        cut = None if last else draw(st.integers(0, size))
        peers.append(FakePeer(bytes(data), cut_at=cut, chunk=draw(st.integers(1, 700))))
    client_range = None
    if draw(st.booleans()):
        first = draw(st.integers(0, size - 1))
        client_range = RangeSpec(first, draw(st.one_of(st.none(), st.integers(first, size + 5))))
    return blob, peers, client_range, lied


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_streamed_blobs_resume_and_never_end_unverified(
    scenario: tuple[bytes, list[FakePeer], RangeSpec | None, bool],
) -> None:
    blob, peers, client_range, lied = scenario
    # a mock clock: deadlines pass only when every task waits, so a busy machine cannot time out
    clock = trio.testing.MockClock(autojump_threshold=0)
    head, body, aborted = trio.run(mirror, blob, peers, client_range, 0, clock=clock)
    assert isinstance(head, MirrorHead)  # the last peer is complete: this never fails
    event("aborted" if aborted else "complete")
    if not lied:
        assert not aborted
    expected = expected_slice(blob, client_range)
    if aborted:
        assert len(body) < len(expected)
        assert body != expected
    else:
        assert body == expected


@settings(max_examples=100, deadline=None)
@given(scenarios(max_size=40_000))
def test_big_blobs_stream_in_double_buffers_resume_and_never_end_unverified(
    scenario: tuple[bytes, list[FakePeer], RangeSpec | None, bool],
) -> None:
    # 4 KiB pool units: a blob above verify_first_max spans many 2-unit (8 KiB) buffers, cut
    # across buffer bounds by resumptions and client ranges
    blob, peers, client_range, lied = scenario
    clock = trio.testing.MockClock(autojump_threshold=0)
    acquired: list[int] = []
    head, body, aborted = trio.run(
        mirror, blob, peers, client_range, 0, 4096, acquired, clock=clock
    )
    assert isinstance(head, MirrorHead)
    assert acquired and set(acquired) == {2}
    if not lied:
        assert not aborted
    expected = expected_slice(blob, client_range)
    if aborted:
        assert len(body) < len(expected)
    else:
        assert body == expected


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_small_blobs_are_verified_before_the_first_byte(
    scenario: tuple[bytes, list[FakePeer], RangeSpec | None, bool],
) -> None:
    blob, peers, client_range, lied = scenario
    clock = trio.testing.MockClock(autojump_threshold=0)
    acquired: list[int] = []
    head, body, aborted = trio.run(
        mirror, blob, peers, client_range, 1 << 20, 4096, acquired, clock=clock
    )
    assert set(acquired) <= {1}  # reserved one-unit buffers (acquire only for a resumption)
    assert not aborted
    if isinstance(head, MirrorFailure):
        event("clean 404")
        assert lied and body == b""
        return
    assert isinstance(head, MirrorHead)
    event("verified")
    assert body == expected_slice(blob, client_range)


def expected_slice(blob: bytes, client_range: RangeSpec | None) -> bytes:
    if client_range is None:
        return blob
    r = client_range.resolve(len(blob))
    return blob[r.start : r.end + 1]
