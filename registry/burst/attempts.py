"""One mirror request's attempts: when to give up, and which peers are still worth asking.

Why pure and low: the fail-over rules (20 ms per resolve attempt, at most N failed attempts,
converged lookups answer at once, claims and refused addresses are never fetched from) are shared by
the provider supplies (`registry.burst.supply`, `registry.burst.claim_supply`) and the mirror run.

Terms: an *attempt* is one wait for a provider (at most `resolve_timeout`) plus, if one arrived,
one fetch from it.  An attempt *fails* when no provider arrived in time, or the fetch failed
(connect error, non-2xx, stall, bad headers, digest mismatch, body cut off).  Successful fetches
do not use up attempts, so a long blob can resume as long as fewer than `max_attempts` failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from registry.burst.peer_addresses import allowed_hosts
from registry.interfaces import Peer, PeerState

__all__ = ["GiveUp", "MirrorAttempts", "PeerKey", "peer_key"]

PeerKey = tuple[str, int]


def peer_key(peer: Peer) -> PeerKey:
    """Peers are told apart by where they answer (a node id may move, an address may not)."""
    return (peer.host, peer.port)


@dataclass(frozen=True, slots=True)
class GiveUp:
    """The mirror request ends with 404 and this message; `attempts` = failed attempts."""

    message: str
    attempts: int


@dataclass(slots=True)
class MirrorAttempts:
    """Counts failed attempts of one mirror request and picks usable peers."""

    identifier: str
    max_attempts: int
    avoid: frozenset[PeerKey] = frozenset()
    failed: int = 0
    fetched: int = 0
    tried: set[PeerKey] = field(default_factory=set)
    allow_loopback: bool = True  # see `registry.burst.peer_addresses`

    def usable(self, peer: Peer) -> bool:
        """True when `peer` should be fetched from (not tried before, not quarantined, not a
        mere claim: a claimant serves nothing until its download starts, and with an address a
        request may go to: `registry.burst.peer_addresses`; a refused one costs no attempt)."""
        key = peer_key(peer)
        return (
            peer.state is not PeerState.CLAIM
            and key not in self.tried
            and key not in self.avoid
            and bool(allowed_hosts(peer, allow_loopback=self.allow_loopback))
        )

    def start_fetch(self, peer: Peer) -> None:
        self.tried.add(peer_key(peer))
        self.fetched += 1

    def fetch_failed(self) -> GiveUp | None:
        """Record a failed fetch; GiveUp when no attempt is left."""
        self.failed += 1
        if self.failed >= self.max_attempts:
            return GiveUp(f"all request retries exhausted for {self.identifier}", self.failed)
        return None

    def wait_timed_out(self) -> GiveUp | None:
        """No provider arrived within the resolve timeout: an attempt is used up."""
        self.failed += 1
        if self.failed >= self.max_attempts:
            return GiveUp(
                f"waited too long for new peer with no inflight fetches for {self.identifier}",
                self.failed,
            )
        return None

    def converged(self) -> GiveUp:
        """The lookup ended and no usable provider is left: give up at once."""
        if self.fetched == 0:
            return GiveUp(f"could not find peer for {self.identifier}", self.failed)
        return GiveUp(f"all request retries exhausted for {self.identifier}", self.failed)
