"""The shared fetch's bookkeeping without sockets: readers, Range cuts, the held-back last byte,
and the memory bound of a blob too big to hold whole (pooled pieces are given back)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from registry.mirror.buffers import BufferPool, Chunk
from registry.mirror.job import MirrorAbort, MirrorFailure, MirrorHead, MirrorItem
from registry.mirror.share import SharedFetches, ShareKey
from registry.oci.distribution import ErrorCode
from registry.oci.ranges import parse_range

PIECE = 4096
KEY: ShareKey = ("docker.io", "sha256:" + "a" * 64, True, None)


def head(size: int) -> MirrorHead:
    return MirrorHead(200, (("Docker-Content-Digest", KEY[1]), ("Content-Length", str(size))))


class Reader:
    def __init__(self) -> None:
        self.items: list[MirrorItem] = []
        self.body = bytearray()

    async def emit(self, item: MirrorItem) -> None:
        if isinstance(item, Chunk):
            with item.view() as view:
                self.body += view
            item.release()
        elif isinstance(item, bytes | bytearray):
            self.body += item
        self.items.append(item)


def pooled(pool: BufferPool, data: bytes) -> Chunk:
    buffer = pool.reserve(1)
    assert buffer is not None
    buffer[0][: len(data)] = data
    return Chunk(pool, buffer[0], 0, len(data))


@pytest.mark.parametrize("retain_max", [1 << 30, PIECE])  # held whole / streamed
async def test_readers_get_their_ranges_and_pieces_go_back_to_the_pool(
    autojump_clock: trio.testing.MockClock, retain_max: int
) -> None:
    body = bytes(range(256)) * (PIECE * 10 // 256)
    pool = BufferPool(PIECE, PIECE * 64)
    shares = SharedFetches(retain_max)
    share, new = shares.join(KEY)
    assert new
    specs = [None, "bytes=0-0", "bytes=5000-20000", "bytes=-1"]
    readers = [Reader() for _ in specs]
    async with trio.open_nursery() as nursery:
        for reader, spec in zip(readers, specs, strict=True):
            r = None if spec is None else parse_range(spec)
            nursery.start_soon(share.read, r, ErrorCode.BLOB_UNKNOWN, reader.emit)
        await trio.sleep(0.1)
        assert shares.join(KEY) == (share, False)  # still open: a newcomer shares it
        await share.send(head(len(body)))
        for start in range(0, len(body), PIECE):
            await share.send(pooled(pool, body[start : start + PIECE]))
            if retain_max == PIECE:
                assert len(share.pieces) <= share.max_ahead + 1  # bounded while streaming
        share.end()
    # the newcomer's join above registered no reader (it never read); the readers' bytes:
    assert bytes(readers[0].body) == body
    assert bytes(readers[1].body) == body[:1]
    assert bytes(readers[2].body) == body[5000:20001]
    assert bytes(readers[3].body) == body[-1:]
    assert isinstance(readers[2].items[0], MirrorHead) and readers[2].items[0].status == 206
    assert pool.in_use == 0  # every piece went back
    assert len(shares) == 0


async def test_the_last_byte_waits_for_the_verdict_and_a_cut_fetch_cuts_every_reader(
    autojump_clock: trio.testing.MockClock,
) -> None:
    body = b"x" * (3 * PIECE)
    shares = SharedFetches(1 << 30)
    share, _ = shares.join(KEY)
    reader = Reader()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(share.read, None, ErrorCode.BLOB_UNKNOWN, reader.emit)
        await share.send(head(len(body)))
        for start in range(0, len(body), PIECE):
            await share.send(body[start : start + PIECE])
        await trio.sleep(0.1)
        assert len(reader.body) == len(body) - 1  # the last byte is held back
        await share.send(MirrorAbort("digest mismatch"))
        share.end()
    assert isinstance(reader.items[-1], MirrorAbort)
    assert len(reader.body) == len(body) - 1


async def test_a_failure_reaches_every_reader_and_the_last_reader_leaving_cancels_the_fetch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shares = SharedFetches(1 << 30)
    share, _ = shares.join(KEY)
    readers = [Reader(), Reader()]
    async with trio.open_nursery() as nursery:
        for reader in readers:
            nursery.start_soon(share.read, None, ErrorCode.BLOB_UNKNOWN, reader.emit)
        await trio.sleep(0.1)
        await share.send(MirrorFailure(404, ErrorCode.BLOB_UNKNOWN, "no provider", 3))
    firsts = [r.items[0] for r in readers]
    assert all(isinstance(f, MirrorFailure) and f.status == 404 for f in firsts), firsts

    share, new = shares.join(KEY)  # the failed one closed: a new fetch
    assert new
    with trio.move_on_after(1.0):
        await share.read(None, ErrorCode.BLOB_UNKNOWN, Reader().emit)
    assert share.scope.cancel_called  # nobody reads it any more
    assert len(shares) == 0


async def test_a_reader_that_stops_pulling_a_big_blob_is_dropped_after_the_consumer_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    body = bytes(range(256)) * (PIECE * 12 // 256)
    pool = BufferPool(PIECE, PIECE * 64)
    shares = SharedFetches(PIECE, consumer_timeout=5.0)  # streamed: bounded ahead of readers
    share, _ = shares.join(KEY)
    stalled = share.reader(None, ErrorCode.BLOB_UNKNOWN)
    reader = share.reader(None, ErrorCode.BLOB_UNKNOWN)  # both join before the head
    active = Reader()
    fetch_done = trio.Event()

    async def fetch() -> None:
        await share.send(head(len(body)))
        for start in range(0, len(body), PIECE):
            await share.send(pooled(pool, body[start : start + PIECE]))
        share.end()
        fetch_done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader.relay, active.emit)
        nursery.start_soon(fetch)
        assert isinstance(await stalled.receive(), MirrorHead)  # then it stops pulling
        await trio.sleep(4.0)
        assert not fetch_done.is_set()  # held back by the stalled reader, within its bound
        with trio.fail_after(60):  # not held back for ever
            await fetch_done.wait()
        # the stalled reader was dropped: its next item is a cut, then the end
        item = await stalled.receive()
        assert isinstance(item, MirrorAbort), item
        with pytest.raises(trio.EndOfChannel):
            await stalled.receive()
        stalled.close()
    assert trio.current_time() >= 5.0
    assert bytes(active.body) == body  # the other reader got every byte
    assert pool.in_use == 0
    assert len(shares) == 0


async def test_a_pulled_item_needs_no_task_in_between(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The fetch's item is there for the reader's next `receive` at once: pulling an available
    item does not yield to the scheduler (the response's own sends do)."""
    shares = SharedFetches(1 << 30)
    share, _ = shares.join(KEY)
    reader = share.reader(None, ErrorCode.BLOB_UNKNOWN)
    await share.send(head(2))
    await share.send(b"ab")
    share.end()
    passes = 0  # a task that counts the scheduler's passes: any yield of ours lets it run

    async def count_passes() -> None:
        nonlocal passes
        while True:
            passes += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(count_passes)
        await trio.lowlevel.checkpoint()  # it runs once
        before = passes
        assert isinstance(await reader.receive(), MirrorHead)
        piece = await reader.receive()
        assert isinstance(piece, Chunk) and bytes(piece.view()) == b"a"
        piece.release()
        assert await reader.receive() == b"b"  # the held-back last byte, after the verdict
        with pytest.raises(trio.EndOfChannel):
            await reader.receive()
        assert passes == before
        nursery.cancel_scope.cancel()
    reader.close()
    assert len(shares) == 0


async def test_a_big_blob_whose_only_reader_stopped_pulling_stops_its_fetch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pool = BufferPool(PIECE, PIECE * 64)
    shares = SharedFetches(PIECE, consumer_timeout=5.0)
    share, _ = shares.join(KEY)
    stalled = share.reader(None, ErrorCode.BLOB_UNKNOWN)
    size = PIECE * 100

    async def fetch() -> None:
        with share.scope:
            await share.send(head(size))
            for _ in range(100):
                await trio.sleep(0.01)  # the peer's bytes take a while
                await share.send(pooled(pool, b"x" * PIECE))
        share.end()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fetch)
        assert isinstance(await stalled.receive(), MirrorHead)  # then it stops pulling
    # the fetch stopped once its only reader was dropped, not after the whole blob
    assert share.scope.cancel_called
    assert share.received < size
    assert 5.0 <= trio.current_time() < 10.0
    stalled.close()
    assert pool.in_use == 0


async def test_a_fetch_that_gave_its_failure_is_not_cancelled_when_its_readers_leave(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The fetch still has to end on its own after its final answer (it reports its outcome:
    the "mirror miss" line and event), so its readers leaving does not cancel it."""
    shares = SharedFetches(1 << 30)
    share, _ = shares.join(KEY)
    reader = share.reader(None, ErrorCode.BLOB_UNKNOWN)
    await share.send(MirrorFailure(404, ErrorCode.BLOB_UNKNOWN, "no provider", 3))
    assert isinstance(await reader.receive(), MirrorFailure)
    reader.close()
    assert not share.scope.cancel_called
    share.end()
    assert len(shares) == 0
