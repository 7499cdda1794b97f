"""The mirror path's agent-wide parts, and the task that answers one request from peers.

Why a producer task: a blob response outlives the request handler, and the fetch needs cancel scopes
and a nursery (the lookup runs beside it) that must not be held across a `yield` of the response
body.  So `Forwarder.run` runs as its own task (in the registry's task nursery, `Registry.run`) and
sends the items of `registry.mirror.job` over a bounded memory channel.  A consumer that goes away
closes its channel; the producer then stops at its next send.

`Forwarder` holds what outlives one request: the peer client, the buffer pool, the quarantine,
stale providers, hedging statistics, claims and this node's own downloads
(`registry.burst.own_downloads`).  One request is sequenced by `registry.mirror.run`, which reads
these through one record (`registry.mirror.context.RunContext`, built by `Forwarder.context`).

Concurrent blob GETs of one digest share one fetch (`registry.mirror.share`): the first starts a
whole-blob `MirrorRun` in `background` (the registry's task nursery, so the fetch outlives whichever
request started it); each of them reads its items (`open_shared`: the response pulls them
itself)."""

from __future__ import annotations

import dataclasses
import logging
from contextlib import suppress

import trio

from registry.burst.claim_supply import ClaimParticipation
from registry.burst.own_downloads import OwnDownloads
from registry.burst.supply import RouterFailure
from registry.events import MirrorEvents
from registry.http.client import PeerClient
from registry.interfaces import DownloadDiscarder, Router
from registry.mirror.buffers import BufferPool
from registry.mirror.context import RunContext
from registry.mirror.hedging import HedgeDelay, HedgePolicy
from registry.mirror.job import ItemSink, MirrorItem, MirrorJob, MirrorSettings
from registry.mirror.peer_answer import Quarantine, StaleProviders
from registry.mirror.peer_race import SlowPeers
from registry.mirror.run import MirrorRun
from registry.mirror.share import SharedFetch, SharedFetches, ShareKey, ShareReader
from registry.mirror.verification import VerificationPolicy
from registry.oci.distribution import ContentKind

__all__ = ["Forwarder", "RouterFailure"]

logger = logging.getLogger(__name__)


class Forwarder:
    """Serves requests the local store cannot, from peers found through the Router."""

    def __init__(
        self,
        router: Router,
        client: PeerClient | None = None,
        settings: MirrorSettings | None = None,
        quarantine: Quarantine | None = None,
        stale: StaleProviders | None = None,
        events: MirrorEvents | None = None,
        claims: ClaimParticipation | None = None,
        discard: DownloadDiscarder | None = None,
    ) -> None:
        self.router = router
        # this node's containerd download to drop when it was already fed bytes that failed
        # their digest (else a retry resumes from the bad prefix and fails at commit again)
        self.discard = discard
        # taking part in bursts' claims (registry.burst.claim); None: plain resolve, as Spegel does
        self.claims = claims
        self.events = events if events is not None else MirrorEvents()
        self.client = client if client is not None else PeerClient()
        self.settings = settings if settings is not None else MirrorSettings()
        self.quarantine = quarantine if quarantine is not None else Quarantine()
        self.buffers = BufferPool(self.settings.buffer_size, self.settings.buffer_memory)
        self.slow_peers = SlowPeers()  # lost a race they were asked first in: hedge at once
        # recent times-to-answer of peers, for the hedge delay (agent-wide)
        self.hedge_delay = HedgeDelay(
            HedgePolicy(floor=self.settings.hedge_floor, ceiling=self.settings.hedge_ceiling)
        )
        self.verification = VerificationPolicy(
            self.quarantine,
            self.buffers,
            verify_first_max=self.settings.verify_first_max,
            max_manifest_size=self.settings.max_manifest_size,
            events=self.events,
        )
        # peers that answered 404 for a key they advertise: skipped for it for a while
        self.stale = stale if stale is not None else StaleProviders(self.settings.stale_ttl)
        # where the blobs streaming to this node's containerd come from (no loops in a burst)
        self.own = OwnDownloads()
        # blob GETs of one digest in flight at once share one fetch; its task runs here (the
        # registry's task nursery; None: every request fetches for itself)
        self.background: trio.Nursery | None = None
        self.shares = SharedFetches(self.settings.verify_first_max, self.settings.consumer_timeout)

    def context(self) -> RunContext:
        """What one run reads of this agent-wide state."""
        return RunContext(
            router=self.router,
            client=self.client,
            settings=self.settings,
            buffers=self.buffers,
            quarantine=self.quarantine,
            verification=self.verification,
            stale=self.stale,
            slow_peers=self.slow_peers,
            hedge_delay=self.hedge_delay,
            own=self.own,
            events=self.events,
            claims=self.claims,
            discard=self.discard,
        )

    def share_key(self, job: MirrorJob) -> ShareKey | None:
        """The key concurrent GETs of `job`'s blob share a fetch under; None: not shared."""
        if job.method != "GET" or job.request.kind is not ContentKind.BLOB:
            return None
        ref = job.request.reference
        if not ref.digest:
            return None
        local = self.claims is None or self.claims.local_client(job.client_ip)
        return (ref.registry, ref.digest, job.claimable, None if local else job.client_ip)

    def open_shared(self, job: MirrorJob) -> ShareReader | None:
        """`job`'s reader of the shared fetch of its blob (started here if it is the first), or
        None when it is not shared (not a blob GET, or no task nursery to run the fetch in)."""
        key = self.share_key(job)
        if key is None or self.background is None:
            return None
        share, new = self.shares.join(key)
        reader = share.reader(job.range_spec, job.request.unknown_code)
        if new:
            whole = dataclasses.replace(job, range_spec=None)
            self.background.start_soon(self._fetch_shared, share, whole)
        return reader

    async def run(self, job: MirrorJob, send: trio.MemorySendChannel[MirrorItem]) -> None:
        """Produce the mirror response for `job` on `send` (closed when done): its own fetch, or
        relayed from the shared fetch of its blob."""
        reader = self.open_shared(job)
        if reader is None:
            await self._run_one(job, send)
            return
        timeout = self.settings.consumer_timeout
        async with send:
            try:
                while True:
                    item = await reader.receive()
                    with trio.fail_after(timeout):  # a response that stops reading leaves
                        await send.send(item)
            except (
                trio.EndOfChannel,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                trio.TooSlowError,
            ):
                pass
            finally:
                reader.close()

    async def _fetch_shared(self, share: SharedFetch, job: MirrorJob) -> None:
        """The one fetch behind `share`: a whole-blob MirrorRun whose items go to the share
        (in this task: no hop between the fetch and the share)."""
        share.transfers += 1
        with share.scope:
            try:
                await self._produce(job, share)
            finally:
                share.end()

    async def _run_one(self, job: MirrorJob, send: trio.MemorySendChannel[MirrorItem]) -> None:
        """One request's own fetch (`registry.mirror.run`), its items on `send`."""
        async with send:
            await self._produce(job, send)

    async def _produce(self, job: MirrorJob, send: ItemSink) -> None:
        state = MirrorRun(self.context(), job, send)
        failure: Exception | None = None
        try:
            await state.run()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        # never let a peer's behaviour crash the registry's task nursery
        except* Exception as group:
            failure = group
        if failure is not None:
            logger.error(
                "mirror request failed",
                exc_info=failure,
                extra={"key": str(job.request.reference)},
            )
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await state.fail(500, f"internal error while mirroring: {failure!r}", 0)
        state.finish()
