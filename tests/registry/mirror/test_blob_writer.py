"""The one hashing writer (`registry.mirror.blob_writer`): every byte hashed in order, only the
delivered range passed on, the last delivered byte held back until the digest matched."""

from __future__ import annotations

import hashlib
import itertools

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from registry.mirror.blob_writer import HashingWriter
from registry.mirror.buffers import BufferPool, Chunk
from registry.oci.ranges import ByteRange

UNIT = 4096
BLOB = bytes(range(256)) * 40  # 10240 bytes: two whole buffers and a partial one
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


class Recorder:
    """A sink that keeps what it was given (as bytes) and gives the buffers back."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []

    async def __call__(self, piece: Chunk | bytes) -> None:
        if isinstance(piece, Chunk):
            with piece.view() as view:
                self.pieces.append(bytes(view))
            piece.release()
        else:
            self.pieces.append(bytes(piece))

    @property
    def joined(self) -> bytes:
        return b"".join(self.pieces)


async def write_all(
    writer: HashingWriter, pool: BufferPool, data: bytes, cuts: list[int] | None = None
) -> None:
    """Feed `data` through `writer` in buffers of the pool's size (at `cuts` when given)."""
    bounds = sorted({0, len(data), *(cuts or range(0, len(data), pool.buffer_size))})
    for start, end in itertools.pairwise(bounds):
        buffer = await pool.acquire()
        buffer[: end - start] = data[start:end]
        await writer.write(Chunk(pool, buffer, 0, end - start))


async def _one(data: bytes, digest: str, delivered: ByteRange | None) -> tuple[bool, Recorder]:
    pool = BufferPool(UNIT, 16 * UNIT)
    sink = Recorder()
    writer = HashingWriter(len(data), digest, delivered, sink)
    await write_all(writer, pool, data)
    ok = await writer.finish()
    assert pool.in_use == 0  # every buffer went back, passed on or not
    return ok, sink


def test_a_matching_blob_is_passed_on_whole_with_the_last_byte_last() -> None:
    ok, sink = trio.run(_one, BLOB, DIGEST, None)
    assert ok and sink.joined == BLOB
    assert sink.pieces[-1] == BLOB[-1:]  # the held-back byte comes only from finish


def test_a_mismatch_holds_back_the_last_byte() -> None:
    tampered = BLOB[:5000] + b"X" + BLOB[5001:]
    ok, sink = trio.run(_one, tampered, DIGEST, None)
    assert not ok
    assert sink.joined == tampered[:-1]  # everything but the last byte went out, never that


def test_a_mismatch_inside_a_range_holds_back_the_ranges_last_byte() -> None:
    tampered = BLOB[:-1] + b"X"  # the lie is past the client's range: still no last byte
    ok, sink = trio.run(_one, tampered, DIGEST, ByteRange(100, 199, len(BLOB)))
    assert not ok and sink.joined == BLOB[100:199]


def test_an_incomplete_blob_does_not_match() -> None:
    async def main() -> None:
        pool = BufferPool(UNIT, 4 * UNIT)
        sink = Recorder()
        writer = HashingWriter(len(BLOB), DIGEST, None, sink)
        await write_all(writer, pool, BLOB[:UNIT])
        assert not writer.matches() and not await writer.finish()
        assert sink.joined == BLOB[:UNIT]

    trio.run(main)


def test_bytes_past_the_blob_are_refused() -> None:
    async def main() -> None:
        pool = BufferPool(UNIT, 4 * UNIT)
        writer = HashingWriter(10, DIGEST, None, Recorder())
        buffer = await pool.acquire()
        with pytest.raises(ValueError, match="past the blob"):
            await writer.write(Chunk(pool, buffer, 0, 11))
        assert pool.in_use == 0

    trio.run(main)


# every range whose ends sit on, next to, or between buffer boundaries
EDGES = sorted({0, 1, UNIT - 1, UNIT, UNIT + 1, 2 * UNIT - 1, 2 * UNIT, len(BLOB) - 1})


@pytest.mark.parametrize("start", EDGES)
@pytest.mark.parametrize("end", EDGES)
def test_range_slicing_at_every_boundary(start: int, end: int) -> None:
    if end < start:
        return
    ok, sink = trio.run(_one, BLOB, DIGEST, ByteRange(start, end, len(BLOB)))
    assert ok and sink.joined == BLOB[start : end + 1]
    assert sink.pieces[-1] == BLOB[end : end + 1]  # the range's last byte, held back to the end
    assert all(sink.pieces)  # no empty chunk is passed on


@settings(max_examples=100, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=3 * UNIT),
    cut_points=st.lists(st.integers(1, 3 * UNIT), max_size=6),
    bounds=st.tuples(st.floats(0, 1), st.floats(0, 1)),
)
def test_any_chunking_and_range_gives_the_same_bytes_and_checkpoints(
    data: bytes, cut_points: list[int], bounds: tuple[float, float]
) -> None:
    """Whatever the chunk boundaries, the same slice goes out, and each recorded checkpoint is
    the sha256 state of exactly the bytes before it."""
    lo, hi = sorted(int(b * (len(data) - 1)) for b in bounds)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    spans = [c for c in cut_points if c < len(data)]

    async def main() -> None:
        pool = BufferPool(3 * UNIT, 8 * 3 * UNIT)
        sink = Recorder()
        writer = HashingWriter(
            len(data), digest, ByteRange(lo, hi, len(data)), sink, checkpoints=True
        )
        bounds_at = sorted({0, len(data), *spans})  # chunks end at the span starts too
        for start, end in itertools.pairwise(bounds_at):
            buffer = await pool.acquire()
            buffer[: end - start] = data[start:end]
            await writer.write(Chunk(pool, buffer, 0, end - start), spans)
        assert await writer.finish()
        assert sink.joined == data[lo : hi + 1]
        for offset, state in writer.checkpoints:
            assert state == hashlib.sha256(data[:offset]).digest()
        assert {o for o, _ in writer.checkpoints} >= set(spans) | {len(data)}

    trio.run(main)
