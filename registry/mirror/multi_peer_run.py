"""One mirror request's side of a multi-peer blob: recruiting providers, opening ranges, finding
the liar.

Why its own module: `registry.mirror.multi_peer` is the byte engine (pieces, reorder window,
in-order hashing) and knows nothing of a request; the mirror run sequences a request and should
not also carry how that engine is fed.  This module is the glue between them: it turns the request's
provider supply and fail-over budget (`MirrorAttempts`) into the engine's `recruit` / `failed` /
`open_range` callbacks, and after a mismatch asks which contributor's bytes do not fit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AsyncExitStack

import trio

from registry.burst.attempts import GiveUp, MirrorAttempts, peer_key
from registry.burst.supply import NoExtraPeer, Supply
from registry.http.client import PeerClient, PeerResponse
from registry.interfaces import Peer
from registry.mirror.blob_stream import BufferSource, Mismatch, Sink
from registry.mirror.job import MirrorSettings
from registry.mirror.multi_peer import MultiPeerSettings, OpenRange, copy_from_peers, find_liars
from registry.mirror.peer_answer import PeerBusy
from registry.mirror.peer_transfer import PeerFetch, TransferRequest, open_transfer
from registry.mirror.report import MirrorReport
from registry.mirror.verification import peer_address
from registry.oci.ranges import ByteRange

__all__ = ["MultiPeerRun"]

logger = logging.getLogger("registry.mirror.forwarder")  # one logger for the mirror path's lines


class MultiPeerRun:
    """What one request lends the multi-peer engine (the mirror run builds one per request)."""

    def __init__(
        self,
        *,
        client: PeerClient,
        transfer: TransferRequest,
        settings: MirrorSettings,
        attempts: MirrorAttempts,
        report: MirrorReport,
        fetch_failed: Callable[[Peer, Exception], None],
        mark_stale: Callable[[Peer], None],
    ) -> None:
        self.client = client
        self.transfer = transfer
        self.settings = settings
        self.attempts = attempts
        self.report = report
        self.fetch_failed = fetch_failed
        self.mark_stale = mark_stale

    def another_provider(self, supply: Supply) -> bool:
        """True when a second usable provider has already turned up (it stays in `supply`)."""
        peer = supply.ready_peer(self.attempts)
        if peer is None:
            return False
        supply.put_back(peer)
        return True

    def open_range(self, size: int) -> OpenRange:
        async def open_range(
            peer: Peer, start: int, end: int, stack: AsyncExitStack
        ) -> PeerResponse:
            fetch = await open_transfer(
                self.client,
                peer,
                self.transfer,
                stack,
                requested=ByteRange(start, end - 1, size),
                expected_size=size,
                response_timeout=self.settings.response_timeout,
                on_not_found=lambda: self.mark_stale(peer),
            )
            return fetch.response

        return open_range

    async def copy(
        self,
        fetch: PeerFetch,
        supply: Supply,
        stack: AsyncExitStack,
        delivered: ByteRange | None,
        sink: Sink,
        buffers: BufferSource,
    ) -> Mismatch | GiveUp | None:
        """A big blob from up to `multi_peer_max` providers at once
        (`registry.mirror.multi_peer`)."""
        settings = self.settings
        key = self.attempts.identifier

        async def recruit(urgent: bool) -> Peer | GiveUp | None:
            peer: Peer | GiveUp | NoExtraPeer
            if urgent:  # nobody is working: the resolve clock applies
                peer = await supply.next_peer(self.attempts)
            else:
                peer = await supply.extra_peer(self.attempts)
                if isinstance(peer, NoExtraPeer):
                    return None
            if isinstance(peer, Peer):
                self.attempts.start_fetch(peer)
                self.report.serving.append(peer)
            return peer

        def failed(peer: Peer, exc: Exception) -> GiveUp | None:
            if isinstance(exc, PeerBusy):  # at its upload limit: not a failure, just not now
                logger.info("peer busy", extra={"peer": peer_address(peer), "key": key})
                return None
            self.fetch_failed(peer, exc)
            return self.attempts.fetch_failed()

        return await copy_from_peers(
            fetch.peer,
            fetch.response,
            fetch.answer.size,
            fetch.answer.digest,
            delivered,
            sink,
            buffers,
            open_range=self.open_range(fetch.answer.size),
            recruit=recruit,
            failed=failed,
            close_first=stack.aclose,
            settings=MultiPeerSettings(
                max_peers=settings.multi_peer_max,
                piece_size=settings.multi_peer_piece,
                window=2 * settings.multi_peer_max,
                stall_timeout=settings.stall_timeout,
                slow_after=settings.multi_peer_slow_after,
            ),
        )

    async def liars(self, outcome: Mismatch, size: int, digest: str, supply: Supply) -> list[Peer]:
        """The peers behind a blob that did not match: only the one whose bytes do not fit
        (found against a provider whose whole blob matches: providers that sent none of these
        bytes are tried first, then the contributors), else all of them."""
        liars = list(outcome.contributors)
        if not outcome.spans:
            return liars
        contributors = {peer_key(peer) for peer in liars}
        others = [p for p in self.report.serving if peer_key(p) not in contributors]
        with trio.move_on_after(self.settings.resolve_timeout):
            while isinstance(peer := await supply.extra_peer(self.attempts), Peer):
                if peer_key(peer) not in contributors:
                    others.append(peer)
        candidates = list({peer_key(p): p for p in others + liars}.values())
        found = await find_liars(
            outcome,
            size,
            digest,
            candidates,
            self.open_range(size),
            self.settings.stall_timeout,
        )
        return found or liars
