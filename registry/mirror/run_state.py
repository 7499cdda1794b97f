"""One mirror request's state, and opening a usable answer from its next provider.

Why its own module: the request's sequences (`registry.mirror.run` for HEAD and manifests,
`registry.mirror.blob_run` for blob bodies) share one account of the request: its attempts, what
went out (`registry.mirror.report`), whether its response head was sent, and the bound until a
provider answers.  Opening a provider's answer (failing over, hedging a slow one:
`registry.mirror.peer_race`) is shared too.  What the run reads of the agent-wide state comes in
one record (`registry.mirror.context.RunContext`); where providers come from is a
`registry.burst.supply.Supply`.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from contextlib import AsyncExitStack
from urllib.parse import quote

import trio

from registry.burst.attempts import GiveUp, MirrorAttempts, peer_key
from registry.burst.own_downloads import FED_BY_HEADER, DownloadFeed, parse_fed_by
from registry.burst.supply import Supply
from registry.events import PeerFetchFailed
from registry.interfaces import Peer, PeerState
from registry.mirror.context import RunContext
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
from registry.mirror.peer_transfer import PeerFetch, TransferRequest, open_transfer
from registry.mirror.report import MirrorReport
from registry.mirror.resume_wait import RefusalRounds
from registry.mirror.verification import peer_address
from registry.oci.distribution import ContentKind
from registry.oci.ranges import ByteRange

__all__ = ["RunState", "logger"]

# every line of the mirror path logs under this one name
logger = logging.getLogger("registry.mirror.forwarder")


class RunState:
    """One mirror request: its attempts, its source now, what went out."""

    def __init__(self, ctx: RunContext, job: MirrorJob, send: ItemSink) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.job = job
        self.send = send
        self.ref = job.request.reference
        self.is_blob = job.request.kind is ContentKind.BLOB
        self.is_head = job.method == "HEAD"
        self.head_sent = False
        self.verify = ctx.verification
        avoid = self.verify.avoided(self.ref.digest)
        avoid |= ctx.stale.peers(self.ref.identifier, trio.current_time())
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
        self.report = MirrorReport(ctx.events, self.ref, job.method, self.is_blob, self.attempts)
        # blob GETs: this download's source now (registry.burst.own_downloads)
        self.feed: DownloadFeed | None = None
        self.refusals = RefusalRounds()  # providers that cannot serve it at all now
        # a blob GET's bound until a provider answers (`MirrorSettings.request_deadline`)
        self.decision: trio.CancelScope | None = None

    @property
    def blob_get(self) -> bool:
        return self.is_blob and not self.is_head and bool(self.ref.digest)

    async def emit(self, item: MirrorItem) -> None:
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

    def decided(self) -> None:
        """A provider answered (its head passed the checks), or the answer is being sent: the
        blob GET's `request_deadline` no longer applies; the stall and resume bounds do."""
        if self.decision is not None:
            self.decision.deadline = math.inf
            self.decision = None

    async def fail(self, status: int, message: str, attempts: int) -> None:
        self.decided()
        if not self.head_sent:
            self.head_sent = True
            code = self.job.request.unknown_code
            await self.emit(MirrorFailure(status, code, message, attempts))
        else:
            await self.emit(MirrorAbort(message))

    async def send_head(self, head: MirrorHead | MirrorFailure) -> None:
        self.decided()
        self.head_sent = True
        await self.emit(head)

    async def unsatisfiable(self, size: int) -> None:
        await self.send_head(range_not_satisfiable(size))

    def content_headers(
        self, answer: PeerAnswer, delivered: ByteRange | None, peer: Peer | None = None
    ) -> MirrorHead:
        return mirror_head(answer, delivered, is_blob=self.is_blob, peer=peer)

    def blob_range(self, size: int) -> ByteRange | None:
        if self.job.range_spec is None:
            return None
        return self.job.range_spec.resolve(size)

    async def fetch(
        self,
        supply: Supply,
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
                self.ctx.client,
                peer,
                self.transfer,
                inner,
                requested=requested,
                expected_size=expected_size,
                response_timeout=self.settings.response_timeout,
                on_not_found=functools.partial(self.mark_stale, peer),
                first_bytes_timeout=stall,
                on_answer=self.decided,
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
                if exc.refused:  # its download has no source, or it is ours: not worth a wait
                    supply.failed(peer)
                else:
                    supply.busy(peer, exc.retry_after)
                return
            supply.failed(peer)
            self.fetch_failed(peer, exc)

        opened = await open_hedged(
            supply,
            self.attempts,
            delay=self.ctx.hedge_delay,
            max_racers=self.settings.hedge_racers,
            open_one=open_one,
            on_failure=failed_or_busy,
            slow=self.ctx.slow_peers,
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

    def multi(self) -> MultiPeerRun:
        """A big blob from several providers at once, on this request's current attempts."""
        return MultiPeerRun(
            client=self.ctx.client,
            transfer=self.transfer,
            settings=self.settings,
            attempts=self.attempts,
            report=self.report,
            fetch_failed=self.fetch_failed,
            mark_stale=self.mark_stale,
        )

    def fetch_failed(self, peer: Peer, exc: Exception) -> None:
        key, error = self.ref.identifier, str(exc) or type(exc).__name__
        failure = PeerFetchFailed(time.time(), key, peer_address(peer), error)
        self.ctx.events.emit(failure)
        logger.info(
            "peer fetch failed",
            extra={"peer": failure.peer, "key": failure.key, "error": failure.error},
        )

    def mark_stale(self, peer: Peer) -> None:
        if peer.state is PeerState.COMPLETE:  # an in-flight provider may hold it a moment later
            self.ctx.stale.add(self.ref.identifier, peer_key(peer), trio.current_time())
