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
same way (a failed
attempt: so a frozen provider cannot be retried forever, and its place goes to another).  While
fewer than `max_peers` work, more providers are asked for (`recruit`).  When no peer works and
none is left, the copy gives up.

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
from dataclasses import dataclass, field

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


@dataclass
class _State:
    plan: RangePlan
    chunks: dict[int, deque[Chunk]] = field(default_factory=dict)
    partial: dict[int, tuple[mmap.mmap, int]] = field(default_factory=dict)  # buffer, filled
    scopes: dict[int, trio.CancelScope] = field(default_factory=dict)  # piece -> owner's scope
    peers: dict[tuple[str, int], Peer] = field(default_factory=dict)
    alive: int = 0
    give_up: GiveUp | None = None
    recruiting_done: bool = False
    recruit_wait: trio.CancelScope | None = None  # a patient wait for more providers
    changed: trio.Event = field(default_factory=trio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


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
    pool = buffers.pool
    piece_size = max(pool.buffer_size, settings.piece_size // pool.buffer_size * pool.buffer_size)
    state = _State(RangePlan(size, piece_size, max(2, settings.window)))
    plan = state.plan
    # prefix digests at every span boundary inside a chunk and at every chunk's end
    writer = HashingWriter(size, digest, delivered, sink, checkpoints=True)

    async def take_buffer(piece: Piece) -> mmap.mmap:
        while True:
            if piece.index == plan.head:
                return await buffers.take()
            buffer = buffers.take_nowait(HEAD_RESERVE)
            if buffer is not None:
                return buffer
            await state.changed.wait()  # the head moved, or buffers came back

    async def read_piece(peer: Peer, stream: PeerResponse, piece: Piece) -> None:
        key = peer_key(peer)
        while not piece.complete:
            buffer, filled = state.partial.pop(piece.index, (None, 0))
            if buffer is None:
                buffer = await take_buffer(piece)
            want = min(len(buffer), piece.end - (piece.offset - filled)) - filled
            try:
                with memoryview(buffer) as view:
                    with trio.fail_after(settings.stall_timeout):
                        n = await stream.receive_into(view[filled : filled + want])
                if n == 0:
                    raise PeerError("peer sent a body of the wrong length")
            except BaseException:
                state.partial[piece.index] = (buffer, filled)  # the next owner goes on with it
                raise
            filled += n
            plan.received(piece, key, n, trio.current_time())
            if filled == len(buffer) or piece.complete:
                queue = state.chunks.setdefault(piece.index, deque())
                queue.append(Chunk(pool, buffer, 0, filled))
                state.notify()  # the writer (and idle workers) care about whole buffers only
            else:
                state.partial[piece.index] = (buffer, filled)

    async def worker(peer: Peer, stream: PeerResponse | None, piece: Piece | None) -> None:
        key = peer_key(peer)
        open_ended = first_stream = stream is not None
        state.peers[key] = peer
        stack = AsyncExitStack()
        try:
            while not plan.done:
                if piece is None:
                    if stream is not None and first_stream and close_first is not None:
                        await close_first()  # what `first` sends on past here is not needed
                    first_stream = False
                    await stack.aclose()
                    stream = None
                    piece = plan.assign(key, trio.current_time())
                    if piece is None:
                        await state.changed.wait()
                        continue
                with trio.CancelScope() as scope:
                    state.scopes[piece.index] = scope
                    try:
                        if stream is None:  # exactly the rest of this piece: nothing wasted
                            stream = await open_range(peer, piece.offset, piece.end, stack)
                        await read_piece(peer, stream, piece)
                    finally:
                        state.scopes.pop(piece.index, None)
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
            give_up = failed(peer, exc)
            if give_up is not None:
                state.give_up = give_up
        finally:
            with trio.CancelScope(shield=True):
                await stack.aclose()
            state.alive -= 1
            if state.alive == 0 and state.recruit_wait is not None:
                state.recruit_wait.cancel()  # nobody works now: wait on the resolve clock
            state.notify()

    async def recruiter(nursery: trio.Nursery) -> None:
        try:
            while not plan.done and state.give_up is None:
                if state.alive >= settings.max_peers:
                    await state.changed.wait()
                    continue
                urgent = state.alive == 0
                peer: Peer | GiveUp | None = None
                with trio.CancelScope() as scope:
                    state.recruit_wait = None if urgent else scope
                    peer = await recruit(urgent)
                state.recruit_wait = None
                if scope.cancelled_caught:
                    continue
                if peer is None or isinstance(peer, GiveUp):
                    if isinstance(peer, GiveUp):
                        state.give_up = peer
                    return
                state.alive += 1
                nursery.start_soon(worker, peer, None, None)
        finally:
            state.recruiting_done = True
            state.notify()

    async with trio.open_nursery() as nursery:
        first_piece = plan.assign(peer_key(first), trio.current_time())
        state.alive = 1
        nursery.start_soon(worker, first, response, first_piece)
        nursery.start_soon(recruiter, nursery)
        try:
            while not plan.done:
                piece = plan.pieces[plan.head]
                queue = state.chunks.get(piece.index)
                if queue:
                    await writer.write(queue.popleft(), (span.start for span in piece.spans))
                    continue
                if piece.complete and piece.index not in state.partial:
                    plan.passed_on(piece)
                    state.chunks.pop(piece.index, None)
                    state.notify()
                    continue
                if state.give_up is not None and state.alive == 0:
                    return state.give_up
                if state.alive == 0 and state.recruiting_done:
                    return GiveUp("no peer left to fetch from", 0)
                with trio.move_on_after(settings.slow_after):
                    await state.changed.wait()
                    continue
                stalled = plan.stalled_head(trio.current_time(), settings.slow_after)
                # only when another peer is there to take it over (a lone peer that stalls for
                # good is caught by stall_timeout and failed over like any broken stream)
                if stalled is not None and stalled.index in state.scopes and state.alive > 1:
                    logger.info(
                        "peer slow with the head of a multi-peer blob; passing it on",
                        extra={"key": digest, "offset": stalled.offset},
                    )
                    state.scopes[stalled.index].cancel()
        finally:
            nursery.cancel_scope.cancel()
            for queue in state.chunks.values():
                for chunk in queue:
                    chunk.release()
            for buffer, _ in state.partial.values():
                pool.release(buffer)
            buffers.close()
    if not await writer.finish():
        spans = plan.spans()
        contributors = tuple(state.peers[s.peer] for s in spans if s.peer in state.peers)
        return Mismatch(
            tuple(dict.fromkeys(contributors)),
            spans=tuple(spans),
            checkpoints=tuple(writer.checkpoints),
        )
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
