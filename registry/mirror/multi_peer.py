"""Fetching one big blob from several peers at once, passed on in order and hashed in order.

Why: a big layer from one peer is limited by that peer's uplink.  Here up to `max_peers` providers
each fetch pieces of the blob (one Range request per piece, on keep-alive connections; the first
provider's whole-blob stream goes on with the next piece while that one is free); the caller's
task takes the pieces in order and hands them to the one hashing writer
(`registry.mirror.blob_writer`: hashed in order, the client's slice passed on, the last byte held
back until the digest matched).  The decisions are `registry.mirror.range_plan`'s; this is the
driver.

Bounded memory: only pieces inside the reorder window are fetched; a piece that is not the head
takes a buffer only while the pool keeps `HEAD_RESERVE` buffers free for heads, so transfers never
starve each other's head piece (which is what makes them progress).

Failures: a peer whose stream breaks or stalls (`stall_timeout`) stops; its piece goes back to the
plan with what it received so far, and a failed attempt is counted.  A head piece whose owner sent
nothing for `slow_after` while another peer works is taken away from it, and that peer stops the
same way (a failed attempt: so a frozen provider cannot be retried forever, and its place goes to
another).  While fewer than `max_peers` work, more providers are asked for (`recruit`).  When no
peer works and none is left, the copy gives up.

Lies: the writer records the prefix digest at every span boundary (where the source of the bytes
changes) and at every buffer end.  When the blob does not match its digest, `find_liars` fetches
it whole from one provider at a time; the first recorded prefix digest that differs from the one
of a provider whose blob matches marks the span that does not fit, and its peer is the liar.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

import trio

from registry.burst.attempts import GiveUp, peer_key
from registry.http.client import PeerError, PeerResponse
from registry.interfaces import Peer
from registry.mirror.blob_stream import BufferSource, Mismatch
from registry.mirror.blob_writer import HashingWriter, Sink
from registry.mirror.buffers import Chunk
from registry.mirror.peer_answer import PeerAnswerError
from registry.mirror.range_plan import Piece, RangePlan
from registry.oci.ranges import ByteRange

__all__ = ["MultiPeerSettings", "OpenRange", "copy_from_peers", "find_liars"]

logger = logging.getLogger("registry.mirror.forwarder")

HEAD_RESERVE = 2  # buffers a non-head piece leaves free in the pool

# opens `peer`'s response for bytes [start, end) on `stack`; raises like open_transfer
OpenRange = Callable[[Peer, int, int, AsyncExitStack], Awaitable[PeerResponse]]


@dataclass(frozen=True, slots=True)
class MultiPeerSettings:
    max_peers: int = 4
    piece_size: int = 4 * 1024 * 1024  # a multiple of the buffer size
    window: int = 8  # pieces fetched or held ahead of the head
    slow_after: float = 1.0  # a head piece with no progress this long changes hands
    stall_timeout: float = 5.0


class _MultiPeerCopy:
    """One multi-peer copy: workers (one per provider) fill pieces, the recruiter adds
    providers, and the caller's task (`run`) writes the head piece's chunks in order.

    Invariants: a piece's bytes are owned by at most one worker at a time (`plan`); a buffer is
    in exactly one place (a worker's hands, `partial`, `chunks`, the writer's sink, or back in
    the pool); `alive` counts the workers running; every change a waiter may care about ends
    with `notify()`.
    """

    def __init__(
        self,
        size: int,
        writer: HashingWriter,
        buffers: BufferSource,
        open_range: OpenRange,
        recruit: Callable[[bool], Awaitable[Peer | GiveUp | None]],
        failed: Callable[[Peer, Exception], GiveUp | None],
        settings: MultiPeerSettings,
        close_first: Callable[[], Awaitable[None]] | None,
    ) -> None:
        pool = buffers.pool
        unit = pool.buffer_size
        piece_size = max(unit, settings.piece_size // unit * unit)
        self.plan = RangePlan(size, piece_size, max(2, settings.window))
        self.writer = writer
        self.buffers = buffers
        self.pool = pool
        self.open_range = open_range
        self.recruit = recruit
        self.failed = failed
        self.settings = settings
        self.close_first = close_first
        self.chunks: dict[int, deque[Chunk]] = {}  # whole buffers of a piece, in order
        self.partial: dict[int, tuple[mmap.mmap, int]] = {}  # piece -> (buffer, filled)
        self.scopes: dict[int, trio.CancelScope] = {}  # piece -> its owner's scope
        self.peers: dict[tuple[str, int], Peer] = {}
        self.alive = 0
        self.give_up: GiveUp | None = None
        self.recruiting_done = False
        self.recruit_wait: trio.CancelScope | None = None  # a patient wait for more providers
        self.changed = trio.Event()

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def take_buffer(self, piece: Piece) -> mmap.mmap:
        while True:
            if piece.index == self.plan.head:
                return await self.buffers.take()
            buffer = self.buffers.take_nowait(HEAD_RESERVE)
            if buffer is not None:
                return buffer
            await self.changed.wait()  # the head moved, or buffers came back

    async def read_piece(self, peer: Peer, stream: PeerResponse, piece: Piece) -> None:
        key = peer_key(peer)
        while not piece.complete:
            buffer, filled = self.partial.pop(piece.index, (None, 0))
            if buffer is None:
                buffer = await self.take_buffer(piece)
            want = min(len(buffer), piece.end - (piece.offset - filled)) - filled
            try:
                with memoryview(buffer) as view:
                    with trio.fail_after(self.settings.stall_timeout):
                        n = await stream.receive_into(view[filled : filled + want])
                if n == 0:
                    raise PeerError("peer sent a body of the wrong length")
            except BaseException:
                self.partial[piece.index] = (buffer, filled)  # the next owner goes on with it
                raise
            filled += n
            self.plan.received(piece, key, n, trio.current_time())
            if filled == len(buffer) or piece.complete:
                queue = self.chunks.setdefault(piece.index, deque())
                queue.append(Chunk(self.pool, buffer, 0, filled))
                self.notify()  # the writer (and idle workers) care about whole buffers only
            else:
                self.partial[piece.index] = (buffer, filled)

    async def worker(self, peer: Peer, stream: PeerResponse | None, piece: Piece | None) -> None:
        plan = self.plan
        key = peer_key(peer)
        open_ended = first_stream = stream is not None
        self.peers[key] = peer
        stack = AsyncExitStack()
        try:
            while not plan.done:
                if piece is None:
                    if stream is not None and first_stream and self.close_first is not None:
                        await self.close_first()  # what `first` sends on past here is not needed
                    first_stream = False
                    await stack.aclose()
                    stream = None
                    piece = plan.assign(key, trio.current_time())
                    if piece is None:
                        await self.changed.wait()
                        continue
                with trio.CancelScope() as scope:
                    self.scopes[piece.index] = scope
                    try:
                        if stream is None:  # exactly the rest of this piece: nothing wasted
                            stream = await self.open_range(peer, piece.offset, piece.end, stack)
                        await self.read_piece(peer, stream, piece)
                    finally:
                        self.scopes.pop(piece.index, None)
                if scope.cancelled_caught:  # taken away for being slow: make room for another
                    plan.stopped(piece, key, slow=True)
                    piece = None
                    raise PeerError("too slow with the head of the blob")
                # only the first stream (the whole blob) can go on with the next piece; a
                # ranged one has ended (its connection goes back to the pool)
                piece = plan.go_on(key, piece, trio.current_time()) if open_ended else None
                open_ended = open_ended and piece is not None
        except (PeerError, PeerAnswerError, trio.TooSlowError) as exc:
            if piece is not None:
                plan.stopped(piece, key)
            give_up = self.failed(peer, exc)
            if give_up is not None:
                self.give_up = give_up
        finally:
            with trio.CancelScope(shield=True):
                await stack.aclose()
            self.alive -= 1
            if self.alive == 0 and self.recruit_wait is not None:
                self.recruit_wait.cancel()  # nobody works now: wait on the resolve clock
            self.notify()

    async def recruiter(self, nursery: trio.Nursery) -> None:
        try:
            while not self.plan.done and self.give_up is None:
                if self.alive >= self.settings.max_peers:
                    await self.changed.wait()
                    continue
                urgent = self.alive == 0
                peer: Peer | GiveUp | None = None
                with trio.CancelScope() as scope:
                    self.recruit_wait = None if urgent else scope
                    peer = await self.recruit(urgent)
                self.recruit_wait = None
                if scope.cancelled_caught:
                    continue
                if peer is None or isinstance(peer, GiveUp):
                    if isinstance(peer, GiveUp):
                        self.give_up = peer
                    return
                self.alive += 1
                nursery.start_soon(self.worker, peer, None, None)
        finally:
            self.recruiting_done = True
            self.notify()

    async def run(self, first: Peer, response: PeerResponse) -> GiveUp | None:
        """Write the blob in order until it is done (None) or nobody can go on (GiveUp)."""
        plan = self.plan
        async with trio.open_nursery() as nursery:
            first_piece = plan.assign(peer_key(first), trio.current_time())
            self.alive = 1
            nursery.start_soon(self.worker, first, response, first_piece)
            nursery.start_soon(self.recruiter, nursery)
            try:
                while not plan.done:
                    piece = plan.pieces[plan.head]
                    queue = self.chunks.get(piece.index)
                    if queue:
                        cuts = (span.start for span in piece.spans)
                        await self.writer.write(queue.popleft(), cuts)
                        continue
                    if piece.complete and piece.index not in self.partial:
                        plan.passed_on(piece)
                        self.chunks.pop(piece.index, None)
                        self.notify()
                        continue
                    if self.give_up is not None and self.alive == 0:
                        return self.give_up
                    if self.alive == 0 and self.recruiting_done:
                        return GiveUp("no peer left to fetch from", 0)
                    with trio.move_on_after(self.settings.slow_after):
                        await self.changed.wait()
                        continue
                    self.pass_on_a_stalled_head()
            finally:
                nursery.cancel_scope.cancel()
                self.release_all()
        return None

    def pass_on_a_stalled_head(self) -> None:
        """Take the head piece from a peer that sent nothing of it for `slow_after`, but only
        when another peer is there to take it over (a lone peer that stalls for good is caught
        by `stall_timeout` and failed over like any broken stream)."""
        stalled = self.plan.stalled_head(trio.current_time(), self.settings.slow_after)
        if stalled is not None and stalled.index in self.scopes and self.alive > 1:
            logger.info(
                "peer slow with the head of a multi-peer blob; passing it on",
                extra={"key": self.writer.digest, "offset": stalled.offset},
            )
            self.scopes[stalled.index].cancel()

    def release_all(self) -> None:
        for queue in self.chunks.values():
            for chunk in queue:
                chunk.release()
        for buffer, _ in self.partial.values():
            self.pool.release(buffer)
        self.buffers.close()

    def mismatch(self) -> Mismatch:
        spans = self.plan.spans()
        contributors = tuple(self.peers[s.peer] for s in spans if s.peer in self.peers)
        return Mismatch(
            tuple(dict.fromkeys(contributors)),
            spans=tuple(spans),
            checkpoints=tuple(self.writer.checkpoints),
        )


async def copy_from_peers(
    first: Peer,
    response: PeerResponse,
    size: int,
    digest: str,
    delivered: ByteRange | None,
    sink: Sink,
    buffers: BufferSource,
    *,
    open_range: OpenRange,
    recruit: Callable[[bool], Awaitable[Peer | GiveUp | None]],
    failed: Callable[[Peer, Exception], GiveUp | None],
    settings: MultiPeerSettings,
    close_first: Callable[[], Awaitable[None]] | None = None,
) -> Mismatch | GiveUp | None:
    """Copy the blob whose full response from `first` is open, with help from more providers.

    Only `first`'s stream runs on past a piece; every other request asks for exactly the bytes
    of one piece (what a provider sent beyond what is used would waste its uplink).
    `recruit(urgent)` returns the next usable provider (urgent: nobody is working, so wait on
    the resolve clock; otherwise wait as long as needed), None when none is left, or GiveUp.
    `close_first()` closes `first`'s response once it is no longer read.
    `failed(peer, exc)` records a failed attempt (GiveUp when none is left).  Returns None on
    success, a `Mismatch` (with the spans and prefix digests for `find_liars`) or a GiveUp.
    """
    # prefix digests at every span boundary inside a chunk and at every chunk's end
    writer = HashingWriter(size, digest, delivered, sink, checkpoints=True)
    copy = _MultiPeerCopy(size, writer, buffers, open_range, recruit, failed, settings, close_first)
    give_up = await copy.run(first, response)
    if give_up is not None:
        return give_up
    if not await writer.finish():
        return copy.mismatch()
    return None


async def find_liars(
    mismatch: Mismatch,
    size: int,
    digest: str,
    candidates: list[Peer],
    open_range: OpenRange,
    stall_timeout: float,
    buffer_size: int = 1024 * 1024,
) -> list[Peer] | None:
    """The peers whose spans do not fit, found against a provider whose whole blob matches
    `digest` (tried in turn from `candidates`); None when no candidate gave a matching blob."""
    expected = dict(mismatch.checkpoints)
    offsets = sorted(expected)
    buffer = bytearray(buffer_size)
    for reference in candidates:
        hasher = hashlib.sha256()
        differs_at: int | None = None  # first byte of the first interval that differs
        previous = position = index = 0
        try:
            async with AsyncExitStack() as stack:
                stream = await open_range(reference, 0, size, stack)
                with memoryview(buffer) as view:
                    while position < size:
                        cut = offsets[index] if index < len(offsets) else size
                        with trio.fail_after(stall_timeout):
                            n = await stream.receive_into(view[: min(len(buffer), cut - position)])
                        if n == 0:
                            raise PeerError("peer sent a body of the wrong length")
                        hasher.update(view[:n])
                        position += n
                        if position == cut and index < len(offsets):
                            if differs_at is None and hasher.copy().digest() != expected[cut]:
                                differs_at = previous
                            previous = cut
                            index += 1
        except (PeerError, PeerAnswerError, trio.TooSlowError):
            continue
        if "sha256:" + hasher.hexdigest() != digest:
            continue  # this one does not serve the true blob either: no reference
        if differs_at is None:
            return []
        by_key = {peer_key(peer): peer for peer in mismatch.contributors}
        return [
            by_key[span.peer]
            for span in mismatch.spans
            if span.start <= differs_at < span.end and span.peer in by_key
        ]
    return None
