"""Reused, capped byte buffers for peer bodies on the mirror path.

Why: a blob proxied from a peer is read from its socket into a buffer, hashed and written to the
client; allocating a fresh buffer per read costs page faults and keeps freed memory in the heap
(docs/decisions/pooled-buffers.md).  Here every body byte lands in one
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
    """Buffers of `buffer_size` (or a few times it), at most `max_bytes` of them in use at once.

    `buffer_size` is the pool's unit: the cap, `in_use`, `free` and `allocated` count units.  A
    streamed big blob reads into buffers of several units (`acquire(units)`: fewer, bigger reads);
    each size keeps up to `keep_idle` idle buffers for reuse (idle ones are outside the cap).
    """

    def __init__(self, buffer_size: int, max_bytes: int, keep_idle: int = 4) -> None:
        if buffer_size < 4096:
            raise ValueError("buffer_size must be at least 4096 bytes")
        self.buffer_size = buffer_size
        self.capacity = max(1, max_bytes // buffer_size)  # units
        self.keep_idle = keep_idle
        self._idle: dict[int, list[mmap.mmap]] = {}  # by units
        self._idle_units = 0
        self.allocated = 0  # units that exist (idle or in use)
        self.peak_in_use = 0
        self._freed = trio.Event()

    @property
    def in_use(self) -> int:
        return self.allocated - self._idle_units

    @property
    def free(self) -> int:
        """Units that can be handed out now (idle ones and room under the cap)."""
        return self.capacity - self.in_use

    def _take(self, units: int) -> mmap.mmap:
        idle = self._idle.get(units)
        if idle:
            buffer = idle.pop()
            self._idle_units -= units
        else:
            buffer = mmap.mmap(-1, units * self.buffer_size)
            self.allocated += units
        self.peak_in_use = max(self.peak_in_use, self.in_use)
        return buffer

    async def acquire(self, units: int = 1) -> mmap.mmap:
        """A buffer of `units` units; waits while fewer than that are free."""
        if not 1 <= units <= self.capacity:
            raise ValueError(f"a buffer of {units} units does not fit the pool")
        await trio.lowlevel.checkpoint()
        while self.free < units:
            await self._freed.wait()
        return self._take(units)

    def reserve(self, count: int) -> list[mmap.mmap] | None:
        """`count` one-unit buffers at once, or None (at once) if they are not free."""
        if count > self.free:
            return None
        return [self._take(1) for _ in range(count)]

    def release(self, buffer: mmap.mmap) -> None:
        units = len(buffer) // self.buffer_size
        idle = self._idle.setdefault(units, [])
        if len(idle) < self.keep_idle:
            idle.append(buffer)
            self._idle_units += units
        else:
            self.allocated -= units
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
