"""The one place a blob's bytes from peers are hashed, cut to the client's range and passed on.

Why one writer: a single peer's stream (`registry.mirror.blob_stream.copy_blob`) and several
peers' pieces (`registry.mirror.multi_peer`) must keep the same promises, so they share this.

Invariants: every byte of the blob goes through `write` exactly once, in order from byte 0 (so
the sha256 covers the whole blob even when the client asked for a range); only bytes inside the
delivered range reach the sink; the last delivered byte is held back and reaches the sink only
from `finish`, and only when the digest matched, so a mismatch can still cut the response short.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Iterable

from registry.mirror.buffers import Chunk
from registry.oci.ranges import ByteRange

__all__ = ["HashingWriter", "Sink"]

Sink = Callable[[Chunk | bytes], Awaitable[None]]


class HashingWriter:
    """Hashes a blob's bytes in order, hands the `delivered` slice of them to `sink`."""

    def __init__(
        self,
        size: int,
        digest: str,
        delivered: ByteRange | None,
        sink: Sink,
        *,
        checkpoints: bool = False,
    ) -> None:
        self.size = size
        self.digest = digest
        self._sink = sink
        whole = ByteRange(0, size - 1, size) if delivered is None else delivered
        self._first, self._last = whole.start, whole.end
        self._hasher = hashlib.sha256()
        self.position = 0  # bytes written (and hashed) so far
        self._held = b""  # the last delivered byte, once read
        # with `checkpoints`: (offset, sha256 state digest of bytes [0, offset)) at every cut
        # and at the end of every write, to find which source's bytes do not fit
        self._record = checkpoints
        self.checkpoints: list[tuple[int, bytes]] = []

    async def write(self, chunk: Chunk, cuts: Iterable[int] = ()) -> None:
        """The blob's next `len(chunk)` bytes: hashed (a prefix digest recorded at each blob
        offset in `cuts` inside the chunk, when recording), then cut to the delivered range and
        passed on; a chunk with no delivered byte left is released here."""
        offset, count = self.position, len(chunk)
        if offset + count > self.size:
            chunk.release()
            raise ValueError(f"{count} bytes at {offset} run past the blob's {self.size}")
        first, last = max(offset, self._first), min(offset + count - 1, self._last)
        with chunk.view() as view:
            at = 0
            if self._record:
                for cut in sorted({c for c in cuts if offset < c < offset + count}):
                    self._hasher.update(view[at : cut - offset])
                    self.checkpoints.append((cut, self._hasher.copy().digest()))
                    at = cut - offset
            self._hasher.update(view[at:])
            if first <= last == self._last:
                self._held = bytes(view[last - offset : last - offset + 1])
        self.position += count
        if self._record:
            self.checkpoints.append((self.position, self._hasher.copy().digest()))
        if first > last:
            chunk.release()
            return
        base = chunk.start
        chunk.start = base + first - offset
        chunk.end = base + last - offset + (0 if last == self._last else 1)
        if len(chunk):
            await self._sink(chunk)
        else:
            chunk.release()

    def matches(self) -> bool:
        """True when the whole blob was written and hashes to the digest."""
        return self.position == self.size and "sha256:" + self._hasher.hexdigest() == self.digest

    async def finish(self) -> bool:
        """Pass on the held-back last byte if the blob matched its digest; False (nothing
        more passed on) if it did not or is incomplete."""
        if not self.matches():
            return False
        await self._sink(self._held)
        return True
