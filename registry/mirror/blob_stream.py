"""Reading one blob from peers: hash every byte, resume a broken stream, hold back the end.

Why its own module: this loop is the part of mirroring where content correctness is decided for
blobs, and it is independent of how providers are found or how responses are framed.  It reads the
whole blob from byte 0 (a client range is cut out of it on the way), so the sha256 always covers
all of it; when a peer's stream breaks or stalls it asks its caller for a continuation (a ranged
fetch from the next provider); the last delivered byte goes to the sink only after the digest
matched, so a mismatch can still cut the response short (the hashing, the cut and the held-back
byte are `registry.mirror.blob_writer`'s).  Bytes are read into pooled buffers
(`registry.mirror.buffers`) and passed on without copies; the verify-first path (small blobs
collected in full before their first byte is sent) reserves its buffers up front, so its memory
is capped too.
"""

from __future__ import annotations

import logging
import math
import mmap
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from registry.burst.attempts import GiveUp
from registry.http.client import PeerError, PeerResponse
from registry.interfaces import Peer
from registry.mirror.blob_writer import HashingWriter, Sink
from registry.mirror.buffers import BufferPool, Chunk
from registry.mirror.range_plan import Span
from registry.oci.ranges import ByteRange
from registry.oci.reference import sha256_digest

__all__ = [
    "BufferSource",
    "Continuation",
    "Mismatch",
    "Sink",
    "collector",
    "copy_blob",
    "release_all",
    "sha256_digest",
]

logger = logging.getLogger(__name__)

# a partly filled buffer is handed on after this long, so a slow peer's bytes still flow
FLUSH_INTERVAL = 0.020


class BufferSource:
    """Where a blob copy gets its buffers: reserved ones first, then the pool (waiting)."""

    def __init__(self, pool: BufferPool, reserved: list[mmap.mmap] | None = None) -> None:
        self.pool = pool
        self._reserved = reserved or []

    async def take(self, units: int = 1) -> mmap.mmap:
        """A reserved buffer, else one of `units` pool units (at most the pool's capacity)."""
        if self._reserved:
            return self._reserved.pop()
        return await self.pool.acquire(min(units, self.pool.capacity))

    def take_nowait(self, keep_free: int) -> mmap.mmap | None:
        """A buffer now, if one is reserved or the pool keeps `keep_free` free after it."""
        if self._reserved:
            return self._reserved.pop()
        if self.pool.free <= keep_free:
            return None
        taken = self.pool.reserve(1)
        return taken[0] if taken else None

    def close(self) -> None:
        """Give back reserved buffers that were not used."""
        reserved, self._reserved = self._reserved, []
        for buffer in reserved:
            self.pool.release(buffer)


@dataclass(frozen=True, slots=True)
class Continuation:
    """A peer's open ranged response continuing a broken stream."""

    peer: Peer
    response: PeerResponse


@dataclass(frozen=True, slots=True)
class Mismatch:
    """The bytes read do not hash to the digest; `contributors` are every peer that sent some."""

    contributors: tuple[Peer, ...]
    message: str = "content from peers does not match its digest"
    # multi-peer copies (registry.mirror.multi_peer): who sent which bytes, and the prefix digests
    # at
    # every boundary between sources, to find the span that does not fit
    spans: tuple[Span, ...] = ()
    checkpoints: tuple[tuple[int, bytes], ...] = ()


async def copy_blob(
    peer: Peer,
    response: PeerResponse,
    size: int,
    digest: str,
    delivered: ByteRange | None,
    sink: Sink,
    resume: Callable[[int], Awaitable[Continuation | GiveUp]],
    stall_timeout: float,
    buffers: BufferSource,
    *,
    fill: bool = False,
    units: int = 1,
) -> Mismatch | GiveUp | None:
    """Read the whole blob (resuming via `resume(offset)`), hash it, pass on the delivered range.

    Bytes are read into buffers from `buffers` (of `units` pool units unless reserved) and passed
    on as `Chunk`s that own them (the sink must release each).  With `fill` every buffer is
    filled before it is passed on (the verify-first path reserves exactly enough); otherwise a
    buffer goes on once a quarter full or `FLUSH_INTERVAL` after its first byte.  The last
    delivered byte goes to `sink` only once the digest matched.  Returns None on success, a
    `Mismatch` or the GiveUp `resume` returned when no peer could continue.
    """
    if size == 0:
        return None if digest == sha256_digest(b"") else Mismatch((peer,))
    writer = HashingWriter(size, digest, delivered, sink)
    contributors = [peer]
    current: PeerResponse | None = response
    pool = buffers.pool
    while writer.position < size:
        position = writer.position
        buffer = await buffers.take(units)
        want = min(len(buffer), size - position)
        filled = 0
        with memoryview(buffer) as view:
            flush_at = math.inf
            while filled < want:
                if current is None:
                    resumed = await resume(position + filled)
                    if isinstance(resumed, GiveUp):
                        pool.release(buffer)
                        return resumed
                    contributors.append(resumed.peer)
                    current = resumed.response
                try:
                    with trio.fail_after(stall_timeout):
                        n = await current.receive_into(view[filled:want])
                    if n == 0:
                        raise PeerError("peer sent a body of the wrong length")
                except (PeerError, trio.TooSlowError) as exc:
                    logger.info(
                        "peer stream broke; resuming",
                        extra={
                            "key": digest,
                            "offset": position + filled,
                            "error": str(exc) or "stalled",
                        },
                    )
                    current = None
                    continue
                if not filled:
                    flush_at = trio.current_time() + FLUSH_INTERVAL
                filled += n
                if not fill and (filled * 4 >= want or trio.current_time() >= flush_at):
                    break
        # hashed inline, in this task (see docs/decisions/hash-inline.md)
        await writer.write(Chunk(pool, buffer, 0, filled))
    if not await writer.finish():
        return Mismatch(tuple(contributors))
    return None


def collector(pieces: list[Chunk | bytes]) -> Sink:
    """A sink that keeps the pieces (the verify-first path sends them once the digest matched)."""

    async def collect(piece: Chunk | bytes) -> None:
        pieces.append(piece)

    return collect


def release_all(pieces: list[Chunk | bytes]) -> None:
    for piece in pieces:
        if isinstance(piece, Chunk):
            piece.release()
    pieces.clear()
