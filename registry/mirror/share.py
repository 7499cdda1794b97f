"""One peer fetch per blob per node: concurrent local GETs of one digest share it.

Why: a node's containerd (or several clients of the node's registry) may ask for the same layer
several times at once.  Each request running its own peer fetch multiplies the provider's uploads
(past its upload limit: 429s, and claims for content a peer holds) and this node's buffer memory.
So the first blob GET of a key starts one fetch of the whole blob (a `MirrorRun`, in the agent's
nursery) whose items land in a `SharedFetch`; every concurrent GET of that key, the first one
included, is a `ShareReader` that its response pulls the items from as they arrive, cut to its
own Range (no task between the fetch and the response: under load every hop between tasks is
one more wait for a pass of the run queue).

Invariants:
- at most one open share per key; a reader joins only an open share, and a share is open only
  while every body byte it received is still held;
- body pieces are the fetch's pooled chunks, shared by reference: a piece goes back to the pool
  once the share no longer holds it and every view handed out of it was released;
- a share holds the whole body only for blobs up to `retain_max` (the fetch holds those whole to
  verify them before their first byte anyway); a bigger blob's share closes to new readers at its
  head, drops each piece once every reader passed it, and runs at most `max_ahead` pieces ahead
  of its slowest reader, so its memory stays bounded;
- a reader sends the last byte of its range only after the whole blob was verified (the fetch
  ended without an abort), like an unshared streamed blob;
- the fetch is cancelled when its last reader leaves; a reader that holds a big blob's fetch back
  for the consumer timeout is dropped (its next item is a cut), so a reader that stopped holds
  the other readers back by at most that long.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable

import trio

from registry.mirror.buffers import Chunk
from registry.mirror.job import MirrorAbort, MirrorFailure, MirrorHead, MirrorItem
from registry.oci.distribution import ErrorCode
from registry.oci.ranges import ByteRange, RangeNotSatisfiable, RangeSpec

__all__ = ["ShareKey", "ShareReader", "SharedFetch", "SharedFetches", "ranged_head"]

# (registry, digest, claimable, the asking host when it is not this node: its records are
# ignored, see registry.burst.claim_supply)
ShareKey = tuple[str, str, bool, str | None]
Emit = Callable[[MirrorItem], Awaitable[None]]


class _Piece:
    """One body item of the fetch, at blob offset `offset`; freed when `refs` reaches 0."""

    __slots__ = ("data", "offset", "refs")

    def __init__(self, data: Chunk | bytes | bytearray, offset: int) -> None:
        self.data = data
        self.offset = offset
        self.refs = 1  # the share's own hold

    def __len__(self) -> int:
        return len(self.data)

    def view(self) -> memoryview:
        return self.data.view() if isinstance(self.data, Chunk) else memoryview(self.data)

    def unref(self) -> None:
        self.refs -= 1
        if self.refs == 0 and isinstance(self.data, Chunk):
            self.data.release()


class _PieceView(Chunk):
    """Bytes `start:end` of a shared piece, handed to one reader's response (a `Chunk` to the
    consumers: `view()` while writing, then `release()`, which gives back its reference)."""

    __slots__ = ("_piece",)

    def __init__(self, piece: _Piece, start: int, end: int) -> None:
        # no buffer of its own: the base class's release/__del__ see no pool and do nothing
        self._pool = None
        self.start, self.end = start, end
        self._piece: _Piece | None = piece
        piece.refs += 1

    def view(self) -> memoryview:
        assert self._piece is not None, "view of a released piece"
        return self._piece.view()[self.start : self.end]

    def release(self) -> None:
        piece, self._piece = self._piece, None
        if piece is not None:
            piece.unref()

    def __del__(self) -> None:
        piece, self._piece = self._piece, None
        if piece is not None:
            try:
                piece.unref()
            except RuntimeError:  # outside Trio (interpreter shutdown)
                pass


def ranged_head(whole: MirrorHead, size: int, delivered: ByteRange | None) -> MirrorHead:
    """The head for `delivered` of a blob whose whole answer is `whole` (None: all of it)."""
    if delivered is None:
        return whole
    keep = ("docker-content-digest", "accept-ranges")
    headers = [(k, v) for k, v in whole.headers if k.lower() in keep]
    headers += [
        ("Content-Type", "application/octet-stream"),
        ("Content-Length", str(delivered.length)),
        ("Content-Range", delivered.content_range),
    ]
    return MirrorHead(206, tuple(headers), whole.inflight)


def _size_of(head: MirrorHead) -> int:
    for name, value in head.headers:
        if name.lower() == "content-length":
            return int(value)
    raise ValueError("a mirror head without Content-Length")


class SharedFetch:
    """The items of one whole-blob fetch, read by every request that joined it."""

    def __init__(
        self, key: ShareKey, retain_max: int, max_ahead: int = 4, consumer_timeout: float = 60.0
    ) -> None:
        self.key = key
        self.retain_max = retain_max
        self.max_ahead = max_ahead
        self.consumer_timeout = consumer_timeout
        self.head: MirrorHead | MirrorFailure | None = None
        self.size = 0
        self.pieces: list[_Piece] = []  # held pieces; pieces[0] has index `first`
        self.first = 0
        self.received = 0  # body bytes received
        self.cut: MirrorAbort | None = None
        self.done = False
        self.open = True  # new readers may join
        self.retaining = True  # every piece is held until the end
        self.readers: dict[int, int] = {}  # reader -> index of the next piece it reads
        self.dropped: set[int] = set()  # readers that held the fetch back too long (no longer read)
        self.scope = trio.CancelScope()  # the fetch's
        self._changed = trio.Event()
        self._ids = itertools.count()
        self.on_close: Callable[[SharedFetch], None] = lambda share: None
        self.transfers = 0  # whole-blob fetches run for it (one; for tests and metrics)

    # -- the fetch's side --------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _close_to_readers(self) -> None:
        if self.open:
            self.open = False
            self.on_close(self)

    async def send(self, value: MirrorItem, /) -> None:
        """One item of the fetch (waits while the slowest reader is `max_ahead` pieces behind):
        the share is the fetch's `ItemSink`."""
        item = value
        if self.done:
            if isinstance(item, Chunk):
                item.release()
            return
        if isinstance(item, MirrorHead | MirrorFailure):
            if self.head is None:
                self.head = item
                if isinstance(item, MirrorHead):
                    self.size = _size_of(item)
                    if self.size > self.retain_max:
                        self.retaining = False
                        self._close_to_readers()
                else:
                    self._close_to_readers()
        elif isinstance(item, MirrorAbort):
            self.cut = item
        else:
            self.pieces.append(_Piece(item, self.received))
            self.received += len(item)
            self._trim()
        self._notify()
        while not self.retaining and self.readers and self._ahead() > self.max_ahead:
            with trio.move_on_after(self.consumer_timeout) as waited:
                await self._changed.wait()
            if waited.cancelled_caught:
                self._drop_slowest()

    def _drop_slowest(self) -> None:
        """The readers furthest behind stopped reading: they leave, with a cut for their next
        item, so the others go on."""
        slowest = min(self.readers.values())
        for reader in [r for r, index in self.readers.items() if index == slowest]:
            del self.readers[reader]
            self.dropped.add(reader)
        if not self.readers:
            self._abandoned()
        self._trim()
        self._notify()

    def end(self) -> None:
        """The fetch is over (its items all put, or it was cancelled)."""
        if not self.done:
            self.done = True
            if self.head is None:
                self.cut = MirrorAbort("the shared fetch ended without an answer")
            self._close_to_readers()
            self._trim()
            self._notify()

    def _ahead(self) -> int:
        slowest = min(self.readers.values(), default=self.first + len(self.pieces))
        return self.first + len(self.pieces) - slowest

    def _trim(self) -> None:
        """Give up held pieces no reader will read again (all of them once nobody reads)."""
        if self.retaining and not (self.done and not self.open):
            return
        slowest = min(self.readers.values(), default=self.first + len(self.pieces))
        while self.pieces and self.first < slowest:
            self.pieces.pop(0).unref()
            self.first += 1

    def _abandoned(self) -> None:
        """Nobody reads the fetch any more: cancel it, unless it already gave its final answer
        (a failure), so that it ends on its own and reports its outcome."""
        if not isinstance(self.head, MirrorFailure):
            self.scope.cancel()

    # -- the readers' side -------------------------------------------------------------------------

    def leave(self, reader: int) -> None:
        self.readers.pop(reader, None)
        self.dropped.discard(reader)
        if not self.readers and not self.done:
            self._close_to_readers()
            self._abandoned()
        self._trim()
        self._notify()

    def reader(self, range_spec: RangeSpec | None, code: ErrorCode) -> ShareReader:
        """A new reader of the fetch's answer cut to `range_spec` (`code`: the OCI error code of
        its failure when the fetch ends without an answer).  It counts from now on: the fetch
        runs as long as one reader has not closed."""
        if not self.open:
            raise RuntimeError("joined a closed share")
        return ShareReader(self, range_spec, code)

    async def read(self, range_spec: RangeSpec | None, code: ErrorCode, emit: Emit) -> None:
        """Relay the fetch's answer to one request (cut to `range_spec`) through `emit`."""
        await self.reader(range_spec, code).relay(emit)

    async def _wait(self) -> None:
        await self._changed.wait()


class ShareReader:
    """One request's side of a `SharedFetch`: its items in channel order (`registry.mirror.job`),
    pulled by the request's own task (`receive`, then `trio.EndOfChannel`), so the fetch's items
    reach the response without a task between them.  `close` leaves the share (the fetch is
    cancelled when its last reader leaves).  A reader that holds a big blob's fetch back longer
    than the consumer timeout is dropped: its next item is a `MirrorAbort`."""

    def __init__(self, share: SharedFetch, range_spec: RangeSpec | None, code: ErrorCode) -> None:
        self._share = share
        self._id = next(share._ids)
        share.readers[self._id] = share.first
        self._range_spec = range_spec
        self._code = code
        self._phase = "head"  # -> "body" -> "end"
        self._start = 0
        self._held = 0  # the last byte of the range: sent once the whole blob was verified
        self._last: bytes | None = None  # the held-back byte, once it arrived
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._phase = "end"
            self._share.leave(self._id)

    async def relay(self, emit: Emit) -> None:
        """Every item to `emit` (for a consumer that is pushed to), then close."""
        try:
            while True:
                try:
                    item = await self.receive()
                except trio.EndOfChannel:
                    return
                await emit(item)
        finally:
            self.close()

    async def receive(self) -> MirrorItem:
        """The next item (waits for the fetch); `trio.EndOfChannel` after the last one."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            item = self._next()
            if item is not None:
                return item
            if self._phase == "end":
                raise trio.EndOfChannel
            await self._share._wait()

    def _next(self) -> MirrorItem | None:
        share = self._share
        if self._phase == "head":
            return self._head()
        if self._phase != "body":
            return None
        if self._id in share.dropped:
            self._phase = "end"
            return MirrorAbort("the response stopped reading the shared fetch")
        index = share.readers[self._id]
        while index < share.first + len(share.pieces):
            piece = share.pieces[index - share.first]
            index += 1
            share.readers[self._id] = index
            held = self._held
            lo = max(self._start, piece.offset)
            hi = min(held, piece.offset + len(piece))
            if piece.offset <= held < piece.offset + len(piece):
                at = held - piece.offset
                self._last = bytes(piece.view()[at : at + 1])
            view = _PieceView(piece, lo - piece.offset, hi - piece.offset) if lo < hi else None
            share._trim()
            share._notify()
            if view is not None:
                return view
        if not share.done:
            return None
        self._phase = "end"
        if share.cut is not None:
            return share.cut
        if share.received < share.size or self._last is None:
            return MirrorAbort("the fetch ended short")
        return self._last

    def _head(self) -> MirrorItem | None:
        share = self._share
        if share.head is None and not share.done:
            return None
        head = share.head
        self._phase = "end"
        if not isinstance(head, MirrorHead):
            if head is not None:
                return head
            reason = share.cut.reason if share.cut is not None else "no answer"
            return MirrorFailure(500, self._code, reason, 0)
        try:
            delivered = None if self._range_spec is None else self._range_spec.resolve(share.size)
        except RangeNotSatisfiable:
            return MirrorFailure(
                416,
                ErrorCode.RANGE_INVALID,
                f"range not satisfiable for {share.size} bytes",
                0,
                (("Content-Range", f"bytes */{share.size}"),),
            )
        self._phase = "body"
        self._start = 0 if delivered is None else delivered.start
        stop = share.size if delivered is None else delivered.end + 1  # exclusive
        self._held = stop - 1
        return ranged_head(head, share.size, delivered)


class SharedFetches:
    """The open shares by key.  Bounded by the requests in flight: a share leaves the table
    when it closes to readers (its head for a big blob, its end, or its last reader gone)."""

    def __init__(self, retain_max: int, consumer_timeout: float = 60.0) -> None:
        self.retain_max = retain_max
        self.consumer_timeout = consumer_timeout
        self._open: dict[ShareKey, SharedFetch] = {}

    def __len__(self) -> int:
        return len(self._open)

    def join(self, key: ShareKey) -> tuple[SharedFetch, bool]:
        """The open share of `key`, or a new one (True: the caller starts its fetch).  Join it
        as a reader (`SharedFetch.reader`) before the next checkpoint, so it cannot close in
        between."""
        share = self._open.get(key)
        if share is not None and share.open:
            return share, False
        share = SharedFetch(key, self.retain_max, consumer_timeout=self.consumer_timeout)
        share.on_close = self._closed
        self._open[key] = share
        return share, True

    def _closed(self, share: SharedFetch) -> None:
        if self._open.get(share.key) is share:
            del self._open[share.key]
