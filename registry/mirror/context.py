"""What one mirror run needs from the agent-wide mirror state, as one typed record.

Why a record: the per-request driver (`registry.mirror.run`) does not import the `Forwarder` that
starts it (no import cycle) and reads nothing of it implicitly.  The Forwarder builds a
`RunContext` from what it owns; the run reads only this.  The objects in it are
shared, agent-wide state (the same buffer pool, quarantine, statistics for every request); the
record itself never changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from registry.burst.attempts import PeerKey
from registry.burst.claim import ClaimSettings
from registry.burst.claim_supply import ClaimingSupply, ClaimParticipation
from registry.burst.own_downloads import OwnDownloads
from registry.burst.supply import PeerSupply, Supply
from registry.events import MirrorEvents
from registry.http.client import PeerClient
from registry.interfaces import DownloadDiscarder, Router
from registry.mirror.buffers import BufferPool
from registry.mirror.hedging import HedgeDelay
from registry.mirror.job import MirrorSettings
from registry.mirror.peer_answer import Quarantine, StaleProviders
from registry.mirror.peer_race import SlowPeers
from registry.mirror.verification import VerificationPolicy

__all__ = ["RunContext"]


@dataclass(frozen=True, slots=True)
class RunContext:
    """The agent-wide parts one mirror run uses (built by `Forwarder.context`)."""

    router: Router
    client: PeerClient
    settings: MirrorSettings
    buffers: BufferPool
    quarantine: Quarantine
    verification: VerificationPolicy  # what is trusted; punishes liars into `quarantine`
    stale: StaleProviders  # peers that answered 404 for a key they advertise
    slow_peers: SlowPeers  # lost a race they were asked first in: hedged at once
    hedge_delay: HedgeDelay
    own: OwnDownloads  # where this node's own downloads stream from (no loops in a burst)
    events: MirrorEvents
    # taking part in bursts' claims; None: plain resolve, as Spegel does
    claims: ClaimParticipation | None = None
    # this node's containerd download to drop after it was fed bytes that failed their digest
    discard: DownloadDiscarder | None = None

    def supply(
        self,
        key: str,
        nursery: trio.Nursery,
        *,
        claim_digest: str | None,
        avoid: frozenset[PeerKey],
        client_ip: str | None,
    ) -> Supply:
        """Where one request's providers come from: a burst's claim/wait for a blob GET that
        may claim (`claim_digest`) when claims are on, else one Router lookup for `key`."""
        s = self.settings
        if self.claims is None or not claim_digest:
            return self.lookup(key)
        settings = ClaimSettings(
            s.resolve_timeout,
            s.resolve_retries,
            s.claim_settle,
            min(s.claim_wait, s.request_deadline),
            s.claim_poll,
        )
        return ClaimingSupply(
            self.router, self.claims, settings, claim_digest, avoid, nursery, client_ip
        )

    def lookup(self, key: str) -> Supply:
        """One Router lookup for `key` on the resolve clock (no claims)."""
        return PeerSupply(self.router, key, self.settings.resolve_timeout)
