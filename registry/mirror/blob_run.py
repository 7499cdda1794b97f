"""One blob GET's body from peers: hold or stream it, resume a broken stream, punish liars.

Why its own module: a blob body is where a mirror run spends its time and where content is
verified; the request's account and opening a provider's answer are `registry.mirror.run_state`'s.
This decides, per answer, whether the blob is held in full until verified (small enough:
`VerificationPolicy.hold_whole`) or streamed with its last byte held back; the byte loop is
`registry.mirror.blob_stream.copy_blob` (one peer at a time) or `registry.mirror.multi_peer` (a
big blob from several), both through one hashing writer (`registry.mirror.blob_writer`).

Resumption: a stream that breaks or stalls continues from the next provider with a ranged
request; once part of the body is out and no provider is left, fresh lookups are tried every
`resume_interval` (`registry.mirror.resume_wait`) for as long as the body still gets further
within `resume_patience`.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import trio

from registry.burst.attempts import GiveUp, MirrorAttempts
from registry.burst.supply import Supply
from registry.interfaces import PeerState
from registry.mirror.blob_stream import (
    BufferSource,
    Continuation,
    Mismatch,
    Sink,
    collector,
    copy_blob,
    release_all,
)
from registry.mirror.buffers import Chunk
from registry.mirror.job import MirrorAbort
from registry.mirror.peer_transfer import PeerFetch
from registry.mirror.resume_wait import RefusalRounds, wait_for_provider
from registry.mirror.run_state import RunState, logger
from registry.oci.ranges import ByteRange, RangeNotSatisfiable

__all__ = ["BlobRun"]


class BlobRun:
    """The body side of one blob GET (the request's state is `run`)."""

    def __init__(self, run: RunState) -> None:
        self.run = run
        self.settings = run.settings
        # no-progress bound across resumptions: the position last reached, and since when
        self.stuck_at = -1
        self.stuck_since = 0.0

    async def serve(self, supply: Supply, stack: AsyncExitStack) -> None:
        run = self.run
        while True:
            fetch = await run.fetch(supply, stack, None, None)
            if isinstance(fetch, GiveUp):
                await run.fail(404, fetch.message, fetch.attempts)
                return
            size = fetch.answer.size
            try:
                delivered = run.blob_range(size)
            except RangeNotSatisfiable:
                await run.unsatisfiable(size)
                return
            head = run.content_headers(fetch.answer, delivered, fetch.peer)
            pool = run.ctx.buffers
            # a provider still downloading it always streams (see MirrorSettings.
            # inflight_stall_timeout): holding the blob would stall this node's own download
            inflight = fetch.peer.state is PeerState.INFLIGHT
            reserved = None if inflight else run.verify.hold_whole(size)
            if reserved is None:
                # too big to hold (or no memory left for it): stream, hashing as it goes, and
                # hold back the last byte
                await run.send_head(head)
                big = not inflight and size > self.settings.verify_first_max
                units = self.settings.stream_buffer_size // pool.buffer_size if big else 1
                source = BufferSource(pool)
                outcome = await self.copy(
                    fetch, supply, stack, delivered, run.emit, source, units=units
                )
                if outcome is not None:
                    await run.emit(MirrorAbort(outcome.message))
                if isinstance(outcome, Mismatch) and outcome.spans:  # several peers: find the liar
                    await stack.aclose()
                    await self.punish(outcome, size, fetch.answer.digest, supply)
                return
            source = BufferSource(pool, reserved)
            pieces: list[Chunk | bytes] = []
            try:
                outcome = await self.copy(
                    fetch, supply, stack, delivered, collector(pieces), source, fill=True
                )
                if outcome is None:  # verified in full: only then does a byte go out
                    await run.send_head(head)
                    while pieces:
                        await run.emit(pieces.pop(0))
                    return
            finally:
                source.close()
                release_all(pieces)
            if isinstance(outcome, GiveUp):
                await run.fail(404, outcome.message, outcome.attempts)
                return
            await stack.aclose()  # a peer lied: nothing was sent, so try the next one
            if isinstance(outcome, Mismatch) and outcome.spans:
                await self.punish(outcome, size, fetch.answer.digest, supply)
            give_up = run.attempts.fetch_failed()
            if give_up is not None:
                await run.fail(404, give_up.message, give_up.attempts)
                return

    def patience_left(self, position: int) -> float:
        """How much longer resumptions may go on: `resume_patience` since the body last got
        further (a resumed source that stalls again at the same byte does not reset it, so a
        burst whose only sources feed each other ends, and containerd resumes elsewhere)."""
        now = trio.current_time()
        if position > self.stuck_at:
            self.stuck_at, self.stuck_since = position, now
        return self.settings.resume_patience - (now - self.stuck_since)

    async def resume_patiently(
        self, stack: AsyncExitStack, requested: ByteRange, give_up: GiveUp, patience: float
    ) -> PeerFetch | GiveUp:
        """Part of the body is out and every source failed: wait for a provider
        (`registry.mirror.resume_wait`), asking peers directly (a claim has decided already), each
        round with fresh attempts (quarantined peers stay avoided)."""
        run = self.run
        saved = run.attempts

        async def attempt(supply: Supply) -> PeerFetch | GiveUp:
            avoid = saved.avoid | run.verify.avoided(run.ref.digest)
            run.attempts = MirrorAttempts(
                saved.identifier, saved.max_attempts, avoid, allow_loopback=saved.allow_loopback
            )
            run.refusals.new_round()
            try:
                return await run.fetch(supply, stack, requested, requested.size)
            finally:
                saved.fetched += run.attempts.fetched

        try:
            resumed = await wait_for_provider(
                lambda: run.ctx.lookup(run.ref.identifier),
                attempt,
                patience=patience,
                interval=self.settings.resume_interval,
                hopeless=run.refusals.hopeless,
            )
        finally:
            run.attempts = saved
        if resumed is None:
            return give_up
        logger.info(
            "mirror stream resumed after waiting for a provider",
            extra={"key": run.ref.identifier, "offset": requested.start},
        )
        return resumed

    async def copy(
        self,
        fetch: PeerFetch,
        supply: Supply,
        stack: AsyncExitStack,
        delivered: ByteRange | None,
        sink: Sink,
        buffers: BufferSource,
        *,
        fill: bool = False,
        units: int = 1,
    ) -> Mismatch | GiveUp | None:
        """`copy_blob` from this fetch (buffers of `units` pool units), resuming from the next
        providers; quarantines liars.  Several providers at once keep one-unit buffers."""
        run = self.run
        size, digest = fetch.answer.size, fetch.answer.digest
        stall = self.settings.stall_timeout
        if fetch.peer.state is PeerState.INFLIGHT:
            stall = self.settings.inflight_stall_timeout

        async def resume(position: int) -> Continuation | GiveUp:
            await stack.aclose()
            if run.feed is not None:
                run.feed.searching()
            run.refusals = RefusalRounds()
            if run.report.serving:
                supply.failed(run.report.serving[-1])  # its stream broke: another source
            requested = ByteRange(position, size - 1, size)
            patience = self.patience_left(position)
            if patience <= 0:
                return GiveUp(
                    f"no progress past byte {position} of {run.ref.identifier} for "
                    f"{self.settings.resume_patience:g} s",
                    run.attempts.failed,
                )
            resumed: PeerFetch | GiveUp | None = run.attempts.fetch_failed()
            if resumed is None:
                resumed = await run.fetch(supply, stack, requested, size)
            if isinstance(resumed, GiveUp) and run.head_sent:
                resumed = await self.resume_patiently(stack, requested, resumed, patience)
            if isinstance(resumed, GiveUp):
                return resumed
            return Continuation(resumed.peer, resumed.response)

        if (
            size >= self.settings.multi_peer_min
            and self.settings.multi_peer_max > 1
            and supply.multi_peer  # not when a burst's claim/wait decides who serves
            and fetch.peer.state is PeerState.COMPLETE  # an in-flight one streams as bytes land
            and run.multi().another_provider(supply)
        ):
            return await run.multi().copy(fetch, supply, stack, delivered, sink, buffers)
        outcome = await copy_blob(
            fetch.peer,
            fetch.response,
            size,
            digest,
            delivered,
            sink,
            resume,
            stall,
            buffers,
            fill=fill,
            units=units,
        )
        if isinstance(outcome, Mismatch):
            run.verify.punish(digest, outcome.contributors, run.ref.registry)
            if run.head_sent and run.ctx.discard is not None:
                await run.ctx.discard.discard_download(digest)
        return outcome

    async def punish(self, outcome: Mismatch, size: int, digest: str, supply: Supply) -> None:
        """Quarantine the peers behind a multi-peer blob that did not match (see
        `MultiPeerRun.liars`) and drop what this node's containerd has of it."""
        run = self.run
        liars = await run.multi().liars(outcome, size, digest, supply)
        run.verify.punish(digest, liars, run.ref.registry)
        if run.head_sent and run.ctx.discard is not None:
            await run.ctx.discard.discard_download(digest)
