"""Reused, capped byte buffers for peer bodies on the mirror path.

Why: a blob proxied from a peer is read from its socket into a buffer, hashed and written to the
client; allocating a fresh buffer per read costs page faults and keeps freed memory in the heap
(RSS grew to ~160 MB after proxying 200 MiB and stayed there).  Here every body byte lands in one
of a few fixed-size anonymous mappings that are handed from request to request; the total is
capped per agent (`max_bytes`, the `--mirror-buffer-memory` flag, sized against the DaemonSet's
memory limit), and mappings beyond `keep_idle` idle ones are unmapped, so RSS returns near idle
after a burst.

Ownership: `acquire` (waits while the cap is reached) or `reserve` (all-or-nothing, never waits)
hand out buffers; a body piece travels as a `Chunk` that owns its buffer and gives it back with
`release()` once the bytes were written (or, as a safety net, when the chunk is garbage-collected,
e.g. left in a channel whose reader went away).
"""

from __future__ import annotations

import mmap

import trio

__all__ = ["BufferPool", "Chunk"]


class BufferPool:
    """Fixed-size buffers, at most `max_bytes` of them in use or idle at once."""

    def __init__(self, buffer_size: int, max_bytes: int, keep_idle: int = 4) -> None:
        if buffer_size < 4096:
            raise ValueError("buffer_size must be at least 4096 bytes")
        self.buffer_size = buffer_size
        self.capacity = max(1, max_bytes // buffer_size)  # buffers
        self.keep_idle = keep_idle
        self._idle: list[mmap.mmap] = []
        self.allocated = 0  # buffers that exist (idle or in use)
        self.peak_in_use = 0
        self._freed = trio.Event()

    @property
    def in_use(self) -> int:
        return self.allocated - len(self._idle)

    @property
    def free(self) -> int:
        """Buffers that can be handed out now (idle ones and room under the cap)."""
        return self.capacity - self.in_use

    def _take(self) -> mmap.mmap:
        if self._idle:
            buffer = self._idle.pop()
        else:
            buffer = mmap.mmap(-1, self.buffer_size)
            self.allocated += 1
        self.peak_in_use = max(self.peak_in_use, self.in_use)
        return buffer

    async def acquire(self) -> mmap.mmap:
        """A buffer; waits while `capacity` buffers are in use."""
        await trio.lowlevel.checkpoint()
        while self.free <= 0:
            await self._freed.wait()
        return self._take()

    def reserve(self, count: int) -> list[mmap.mmap] | None:
        """`count` buffers at once, or None (at once) if they are not free."""
        if count > self.free:
            return None
        return [self._take() for _ in range(count)]

    def release(self, buffer: mmap.mmap) -> None:
        if len(self._idle) < self.keep_idle:
            self._idle.append(buffer)
        else:
            self.allocated -= 1
            try:
                buffer.close()  # unmapped now: RSS goes down at once
            except BufferError:
                pass  # a view still points into it; freed when that view goes
        self._freed.set()
        self._freed = trio.Event()


class Chunk:
    """Bytes `start:end` of a pooled buffer, owned until `release()`."""

    __slots__ = ("_buffer", "_pool", "end", "start")

    def __init__(self, pool: BufferPool, buffer: mmap.mmap, start: int, end: int) -> None:
        self._pool: BufferPool | None = pool
        self._buffer = buffer
        self.start = start
        self.end = end

    def __len__(self) -> int:
        return self.end - self.start

    def view(self) -> memoryview:
        """The bytes (valid until `release`; drop the view before releasing)."""
        return memoryview(self._buffer)[self.start : self.end]

    def release(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.release(self._buffer)

    def __del__(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            # outside Trio (interpreter shutdown) the pool's Event cannot be touched
            try:
                pool.release(self._buffer)
            except RuntimeError:
                pass
