"""One mirror request, sequenced: resolve providers, fetch from one, fail over, resume, verify.

Why its own module: the agent-wide parts (`registry.mirror.forwarder`) outlive requests; this is the
per-request state machine's driver (fail over, resume, frame the answer, log its outcome).  Its
seams live beside it: where the next peer comes from (`registry.burst.supply`), one transfer from
one peer (`registry.mirror.peer_transfer`), what is trusted (`registry.mirror.verification`) and
the byte loop of
a blob (`registry.mirror.blob_stream`).

Deadlines, all Trio cancel scopes: each wait for a provider `resolve_timeout` (20 ms), at most
`resolve_retries` failed attempts; connect + response headers `response_timeout`; no body bytes
for `stall_timeout` counts as a broken stream; HEAD and manifests finish within
`manifest_deadline` (3 s) overall; a blob GET has a provider answering (its response head
checked) or its 404 within `request_deadline` (claim waits and busy providers included), then
its body is bounded by the stall bounds, and resumptions end after `resume_patience` without
progress.  A peer answering 404 for a key it advertised (deleted since;
its provider records live on) is skipped for that key for `stale_ttl` (60 s) by later requests
(`mirror.StaleProviders`).

Verification and client ranges: `registry.mirror.verification` says what is trusted and how a
resumed
range is verified; this module applies it.

Hedging and several peers: a provider that has not answered within the hedge delay gets company
(`registry.mirror.peer_race`); a big blob is fetched as ranges from up to `multi_peer_max`
providers.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from contextlib import AsyncExitStack, ExitStack
from typing import TYPE_CHECKING
from urllib.parse import quote

import trio

from registry.burst.attempts import GiveUp, MirrorAttempts, peer_key
from registry.burst.claim import ClaimSettings
from registry.burst.claim_supply import ClaimingSupply
from registry.burst.own_downloads import FED_BY_HEADER, DownloadFeed, parse_fed_by
from registry.burst.supply import PeerSupply
from registry.events import PeerFetchFailed
from registry.interfaces import Peer, PeerState
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
from registry.mirror.framing import mirror_head, range_not_satisfiable
from registry.mirror.job import (
    ItemSink,
    MirrorAbort,
    MirrorFailure,
    MirrorHead,
    MirrorItem,
    MirrorJob,
)
from registry.mirror.multi_peer_run import MultiPeerRun
from registry.mirror.peer_answer import PeerAnswer, PeerBusy
from registry.mirror.peer_race import open_hedged
from registry.mirror.peer_transfer import PeerFetch, TransferRequest, open_transfer, read_whole_body
from registry.mirror.report import MirrorReport
from registry.mirror.resume_wait import RefusalRounds, wait_for_provider
from registry.mirror.verification import peer_address
from registry.oci.distribution import ContentKind
from registry.oci.ranges import ByteRange, RangeNotSatisfiable

__all__ = ["MirrorRun"]

# the name the mirror path's lines have always had
logger = logging.getLogger("registry.mirror.forwarder")

if TYPE_CHECKING:
    from registry.mirror.forwarder import Forwarder


class MirrorRun:
    """One mirror request: its attempts, its source now, what went out, and the sequence."""

    def __init__(self, forwarder: Forwarder, job: MirrorJob, send: ItemSink) -> None:
        self.fw = forwarder
        self.settings = forwarder.settings
        self.job = job
        self.send = send
        self.ref = job.request.reference
        self.is_blob = job.request.kind is ContentKind.BLOB
        self.is_head = job.method == "HEAD"
        self.head_sent = False
        self.verify = forwarder.verification
        avoid = self.verify.avoided(self.ref.digest)
        avoid |= forwarder.stale.peers(self.ref.identifier, trio.current_time())
        self.attempts = MirrorAttempts(
            self.ref.identifier,
            self.settings.resolve_retries,
            avoid,
            allow_loopback=self.settings.allow_loopback_peers,
        )
        self.transfer = TransferRequest(
            method=job.method,
            target=f"{job.request.path}?ns={quote(self.ref.registry, safe=':[]')}",
            expected_digest=self.ref.digest,
            is_blob=self.is_blob,
            user_agent=self.settings.user_agent,
            authorization=self.settings.authorization,
            peer_auth=self.settings.peer_auth,
            reference=str(self.ref),
            path=job.request.path,
            ns=self.ref.registry,
            allow_loopback=self.settings.allow_loopback_peers,
        )
        # what went out, reported as events and the one outcome log line
        self.report = MirrorReport(
            forwarder.events, self.ref, job.method, self.is_blob, self.attempts
        )
        self.claiming: ClaimingSupply | None = None  # blob GETs when claims are on
        # blob GETs: this download's source now (registry.burst.own_downloads)
        self.feed: DownloadFeed | None = None
        # no-progress bound across resumptions: the position last reached, and since when
        self.stuck_at = -1
        self.stuck_since = 0.0
        self.refusals = RefusalRounds()  # providers that cannot serve it at all now
        # a blob GET's bound until a provider answers (`MirrorSettings.request_deadline`)
        self.decision: trio.CancelScope | None = None

    async def _emit(self, item: MirrorItem) -> None:
        """Hand an item to the response; a response that stops reading counts as gone."""
        with trio.move_on_after(self.settings.consumer_timeout) as scope:
            try:
                await self.send.send(item)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.report.gone("the client went away")
                raise
        if scope.cancelled_caught:
            self.report.gone("the response stopped reading")
            raise trio.BrokenResourceError("the response stopped reading")
        self.report.sent(item)

    def finish(self) -> None:
        self.report.finish()

    def _decided(self) -> None:
        """A provider answered (its head passed the checks), or the answer is being sent: the
        blob GET's `request_deadline` no longer applies; the stall and resume bounds do."""
        if self.decision is not None:
            self.decision.deadline = math.inf
            self.decision = None

    async def fail(self, status: int, message: str, attempts: int) -> None:
        self._decided()
        if not self.head_sent:
            self.head_sent = True
            code = self.job.request.unknown_code
            await self._emit(MirrorFailure(status, code, message, attempts))
        else:
            await self._emit(MirrorAbort(message))

    async def run(self) -> None:
        bounded = self.is_head or not self.is_blob
        s = self.settings
        deadline = s.manifest_deadline if bounded else s.request_deadline
        with trio.move_on_after(deadline) as overall:
            if not bounded:
                self.decision = overall  # lifted once a provider answers (see `_fetch`)
            async with trio.open_nursery() as nursery:
                supply = PeerSupply(self.fw.router, self.ref.identifier)
                claims = self.fw.claims
                if (
                    claims is not None
                    and self.is_blob
                    and not self.is_head
                    and self.ref.digest
                    and self.job.claimable
                ):
                    self.claiming = ClaimingSupply(
                        self.fw.router,
                        claims,
                        ClaimSettings(
                            s.resolve_timeout,
                            s.resolve_retries,
                            s.claim_settle,
                            min(s.claim_wait, s.request_deadline),
                            s.claim_poll,
                        ),
                        self.ref.digest,
                        self.attempts.avoid,
                        nursery,
                        self.job.client_ip,
                    )
                else:
                    nursery.start_soon(supply.feed)
                try:
                    with ExitStack() as feeds:
                        if self.is_blob and not self.is_head and self.ref.digest:
                            self.feed = feeds.enter_context(self.fw.own.open(self.ref.digest))
                        async with AsyncExitStack() as stack:
                            await self._serve(supply, stack)
                finally:
                    if self.claiming is not None:
                        await self.claiming.finish()
                nursery.cancel_scope.cancel()
        if overall.cancelled_caught:
            await self.fail(
                404, f"mirror deadline exceeded for {self.ref.identifier}", self.attempts.failed
            )

    async def _fetch(
        self,
        supply: PeerSupply,
        stack: AsyncExitStack,
        requested: ByteRange | None,
        expected_size: int | None,
    ) -> PeerFetch | GiveUp:
        """Open a usable response from the next working provider (failing over as needed; a
        provider slow to answer is hedged with the next one, see `registry.mirror.peer_race`)."""

        async def open_one(peer: Peer, inner: AsyncExitStack) -> PeerFetch:
            # an answer counts (wins the race) once its first body bytes are here, within the
            # same bound a stalled body has: a provider still downloading may wait on upstream
            stall = self.settings.stall_timeout
            if peer.state is PeerState.INFLIGHT:
                stall = self.settings.inflight_stall_timeout
            return await open_transfer(
                self.fw.client,
                peer,
                self.transfer,
                inner,
                requested=requested,
                expected_size=expected_size,
                response_timeout=self.settings.response_timeout,
                on_not_found=functools.partial(self._mark_stale, peer),
                first_bytes_timeout=stall,
                on_answer=self._decided,
            )

        def failed_or_busy(peer: Peer, exc: Exception) -> None:
            if isinstance(exc, PeerBusy):  # at its upload limit: the next provider is asked
                self.refusals.count(exc)
                logger.info(
                    "peer refused" if exc.refused else "peer busy",
                    extra={
                        "peer": peer_address(peer),
                        "key": self.ref.identifier,
                        "reason": exc.refused or "upload limit",
                    },
                )
                if self.claiming is not None:
                    if exc.refused:  # its download has no source, or it is ours: not worth a wait
                        self.claiming.failed(peer)
                    else:
                        self.claiming.busy(peer, exc.retry_after)
                return
            if self.claiming is not None:
                self.claiming.failed(peer)
            self._fetch_failed(peer, exc)

        claiming = self.claiming
        opened = await open_hedged(
            supply,
            self.attempts,
            resolve_timeout=self.settings.resolve_timeout,
            delay=self.fw.hedge_delay,
            max_racers=self.settings.hedge_racers,
            open_one=open_one,
            on_failure=failed_or_busy,
            next_peer=None
            if claiming is None
            else functools.partial(claiming.next_peer, self.attempts),
            slow=self.fw.slow_peers,
            # a burst's claim/wait decides who is asked first (registry.burst.claim); a hedge goes
            # only to a complete provider it has already seen
            spare_peer=None
            if claiming is None
            else functools.partial(claiming.spare_peer, self.attempts),
        )
        if isinstance(opened, GiveUp):
            return opened
        stack.push_async_callback(opened.stack.aclose)
        if opened.hedged:
            self.report.hedged = True
        if expected_size is None:
            self.report.serving = [opened.peer]  # a fresh answer (not a resumption)
        else:
            self.report.serving.append(opened.peer)
        if self.feed is not None:
            peer = opened.result.peer
            chain: tuple[str, ...] = ()
            if peer.state is PeerState.INFLIGHT:
                chain = parse_fed_by(opened.result.response.headers.get(FED_BY_HEADER.lower()))
            self.feed.streaming(peer.host, chain)
        return opened.result

    def _multi(self) -> MultiPeerRun:
        """A big blob from several providers at once, on this request's current attempts."""
        return MultiPeerRun(
            client=self.fw.client,
            transfer=self.transfer,
            settings=self.settings,
            attempts=self.attempts,
            report=self.report,
            fetch_failed=self._fetch_failed,
            mark_stale=self._mark_stale,
        )

    def _fetch_failed(self, peer: Peer, exc: Exception) -> None:
        key, error = self.ref.identifier, str(exc) or type(exc).__name__
        failure = PeerFetchFailed(time.time(), key, peer_address(peer), error)
        self.fw.events.emit(failure)
        logger.info(
            "peer fetch failed",
            extra={"peer": failure.peer, "key": failure.key, "error": failure.error},
        )

    def _mark_stale(self, peer: Peer) -> None:
        if peer.state is PeerState.COMPLETE:  # an in-flight provider may hold it a moment later
            self.fw.stale.add(self.ref.identifier, peer_key(peer), trio.current_time())

    async def _serve(self, supply: PeerSupply, stack: AsyncExitStack) -> None:
        if self.is_head:
            await self._serve_head(supply, stack)
        elif self.is_blob:
            await self._serve_blob(supply, stack)
        else:
            await self._serve_manifest(supply, stack)

    def _blob_range(self, size: int) -> ByteRange | None:
        if self.job.range_spec is None:
            return None
        return self.job.range_spec.resolve(size)

    def _content_headers(
        self, answer: PeerAnswer, delivered: ByteRange | None, peer: Peer | None = None
    ) -> MirrorHead:
        return mirror_head(answer, delivered, is_blob=self.is_blob, peer=peer)

    async def _send_head(self, head: MirrorHead | MirrorFailure) -> None:
        self._decided()
        self.head_sent = True
        await self._emit(head)

    async def _unsatisfiable(self, size: int) -> None:
        await self._send_head(range_not_satisfiable(size))

    async def _serve_head(self, supply: PeerSupply, stack: AsyncExitStack) -> None:
        fetch = await self._fetch(supply, stack, None, None)
        if isinstance(fetch, GiveUp):
            await self.fail(404, fetch.message, fetch.attempts)
            return
        try:
            delivered = self._blob_range(fetch.answer.size)
        except RangeNotSatisfiable:
            await self._unsatisfiable(fetch.answer.size)
            return
        await self._send_head(self._content_headers(fetch.answer, delivered, fetch.peer))

    async def _serve_manifest(self, supply: PeerSupply, stack: AsyncExitStack) -> None:
        while True:
            fetch = await self._fetch(supply, stack, None, None)
            if isinstance(fetch, GiveUp):
                await self.fail(404, fetch.message, fetch.attempts)
                return
            body = await self._read_manifest(fetch)
            if body is not None:
                await self._send_head(self._content_headers(fetch.answer, None))
                await self._emit(body)
                return
            await stack.aclose()
            give_up = self.attempts.fetch_failed()
            if give_up is not None:
                await self.fail(404, give_up.message, give_up.attempts)
                return

    async def _read_manifest(self, fetch: PeerFetch) -> bytes | None:
        """The peer's verified manifest body, or None (peer failed or lied)."""
        answer = fetch.answer
        if self.verify.manifest_too_big(answer):
            return None
        body = await read_whole_body(fetch, self.settings.stall_timeout)
        if body is None:
            return None
        if not self.verify.manifest_matches(body, answer):
            self.verify.punish(answer.digest, [fetch.peer], self.ref.registry)
            return None
        return body

    async def _serve_blob(self, supply: PeerSupply, stack: AsyncExitStack) -> None:
        while True:
            fetch = await self._fetch(supply, stack, None, None)
            if isinstance(fetch, GiveUp):
                await self.fail(404, fetch.message, fetch.attempts)
                return
            size = fetch.answer.size
            try:
                delivered = self._blob_range(size)
            except RangeNotSatisfiable:
                await self._unsatisfiable(size)
                return
            head = self._content_headers(fetch.answer, delivered, fetch.peer)
            pool = self.fw.buffers
            # a provider still downloading it always streams (see MirrorSettings.
            # inflight_stall_timeout): holding the blob would stall this node's own download
            inflight = fetch.peer.state is PeerState.INFLIGHT
            reserved = None if inflight else self.verify.hold_whole(size)
            if reserved is None:
                # too big to hold (or no memory left for it): stream, hashing as it goes, and
                # hold back the last byte
                await self._send_head(head)
                big = not inflight and size > self.settings.verify_first_max
                units = self.settings.stream_buffer_size // pool.buffer_size if big else 1
                source = BufferSource(pool)
                outcome = await self._copy(
                    fetch, supply, stack, delivered, self._emit, source, units=units
                )
                if outcome is not None:
                    await self._emit(MirrorAbort(outcome.message))
                if isinstance(outcome, Mismatch) and outcome.spans:  # several peers: find the liar
                    await stack.aclose()
                    await self._punish(outcome, size, fetch.answer.digest, supply)
                return
            source = BufferSource(pool, reserved)
            pieces: list[Chunk | bytes] = []
            try:
                outcome = await self._copy(
                    fetch, supply, stack, delivered, collector(pieces), source, fill=True
                )
                if outcome is None:  # verified in full: only now does a byte go out
                    await self._send_head(head)
                    while pieces:
                        await self._emit(pieces.pop(0))
                    return
            finally:
                source.close()
                release_all(pieces)
            if isinstance(outcome, GiveUp):
                await self.fail(404, outcome.message, outcome.attempts)
                return
            await stack.aclose()  # a peer lied: nothing was sent, so try the next one
            if isinstance(outcome, Mismatch) and outcome.spans:
                await self._punish(outcome, size, fetch.answer.digest, supply)
            give_up = self.attempts.fetch_failed()
            if give_up is not None:
                await self.fail(404, give_up.message, give_up.attempts)
                return

    def _patience_left(self, position: int) -> float:
        """How much longer resumptions may go on: `resume_patience` since the body last got
        further (a resumed source that stalls again at the same byte does not reset it, so a
        burst whose only sources feed each other ends, and containerd resumes elsewhere)."""
        now = trio.current_time()
        if position > self.stuck_at:
            self.stuck_at, self.stuck_since = position, now
        return self.settings.resume_patience - (now - self.stuck_since)

    async def _resume_patiently(
        self, stack: AsyncExitStack, requested: ByteRange, give_up: GiveUp, patience: float
    ) -> PeerFetch | GiveUp:
        """Part of the body is out and every source failed: wait for a provider
        (`registry.mirror.resume_wait`), asking peers directly (a claim has decided already), each
        round with fresh attempts (quarantined peers stay avoided)."""
        saved, claiming = self.attempts, self.claiming
        self.claiming = None

        async def attempt(supply: PeerSupply) -> PeerFetch | GiveUp:
            avoid = saved.avoid | self.verify.avoided(self.ref.digest)
            self.attempts = MirrorAttempts(
                saved.identifier, saved.max_attempts, avoid, allow_loopback=saved.allow_loopback
            )
            self.refusals.new_round()
            try:
                return await self._fetch(supply, stack, requested, requested.size)
            finally:
                saved.fetched += self.attempts.fetched

        try:
            resumed = await wait_for_provider(
                self.fw.router,
                self.ref.identifier,
                attempt,
                patience=patience,
                interval=self.settings.resume_interval,
                hopeless=self.refusals.hopeless,
            )
        finally:
            self.attempts, self.claiming = saved, claiming
        if resumed is None:
            return give_up
        logger.info(
            "mirror stream resumed after waiting for a provider",
            extra={"key": self.ref.identifier, "offset": requested.start},
        )
        return resumed

    async def _copy(
        self,
        fetch: PeerFetch,
        supply: PeerSupply,
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
        size, digest = fetch.answer.size, fetch.answer.digest
        stall = self.settings.stall_timeout
        if fetch.peer.state is PeerState.INFLIGHT:
            stall = self.settings.inflight_stall_timeout

        async def resume(position: int) -> Continuation | GiveUp:
            await stack.aclose()
            if self.feed is not None:
                self.feed.searching()
            self.refusals = RefusalRounds()
            if self.claiming is not None and self.report.serving:
                self.claiming.failed(self.report.serving[-1])  # its stream broke: another source
            requested = ByteRange(position, size - 1, size)
            patience = self._patience_left(position)
            if patience <= 0:
                return GiveUp(
                    f"no progress past byte {position} of {self.ref.identifier} for "
                    f"{self.settings.resume_patience:g} s",
                    self.attempts.failed,
                )
            resumed: PeerFetch | GiveUp | None = self.attempts.fetch_failed()
            if resumed is None:
                resumed = await self._fetch(supply, stack, requested, size)
            if isinstance(resumed, GiveUp) and self.head_sent:
                resumed = await self._resume_patiently(stack, requested, resumed, patience)
            if isinstance(resumed, GiveUp):
                return resumed
            return Continuation(resumed.peer, resumed.response)

        if (
            size >= self.settings.multi_peer_min
            and self.settings.multi_peer_max > 1
            # a burst's claim/wait decides who serves (registry.burst.claim)
            and self.claiming is None
            and fetch.peer.state is PeerState.COMPLETE  # an in-flight one streams as bytes land
            and self._multi().another_provider(supply)
        ):
            return await self._multi().copy(fetch, supply, stack, delivered, sink, buffers)
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
            self.verify.punish(digest, outcome.contributors, self.ref.registry)
            if self.head_sent and self.fw.discard is not None:
                await self.fw.discard.discard_download(digest)
        return outcome

    async def _punish(self, outcome: Mismatch, size: int, digest: str, supply: PeerSupply) -> None:
        """Quarantine the peers behind a multi-peer blob that did not match (see
        `MultiPeerRun.liars`) and drop what this node's containerd has of it."""
        liars = await self._multi().liars(outcome, size, digest, supply)
        self.verify.punish(digest, liars, self.ref.registry)
        if self.head_sent and self.fw.discard is not None:
            await self.fw.discard.discard_download(digest)
