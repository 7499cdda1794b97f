"""Which provider a requester asks for a blob, and how a provider bounds its uploads; no I/O.

Why pure: in a burst (hundreds of nodes missing the same layer) the choice decides whether the
transfer forms a tree or a star.  Rules, shared by the agent and `bench.rollout`:
- A provider record says `complete` (the blob is committed), `inflight` (the provider's containerd
  is still receiving it: bytes land in its ingest and it serves them as they arrive) or `claim`
  (it is about to fetch it from upstream; not a source yet).  Receivers become inflight providers
  themselves, so each node that got bytes adds upload capacity.
- Complete providers come before inflight ones; within a class the order is a rendezvous hash of
  (requester, provider, key): deterministic per requester, spread evenly over requesters, so a
  thousand requesters do not all pick the same first provider.
- A provider serves at most `limit` uploads at once (`UploadSlots`); beyond that it answers busy
  (429 with Retry-After) and the requester moves on to the next provider (`BusyPeers` remembers
  it until the Retry-After passes) instead of queueing behind it.
Times are the caller's clock (`now`).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from cachetools import TLRUCache

__all__ = [
    "BusyPeers",
    "PeerKey",
    "RecordState",
    "Sighting",
    "UploadSlots",
    "rank_providers",
]

PeerKey = tuple[str, int]


class RecordState(enum.Enum):
    """What a provider record says about the provider's copy."""

    COMPLETE = "complete"
    INFLIGHT = "inflight"
    CLAIM = "claim"

    @property
    def is_source(self) -> bool:
        """A provider in this state can be fetched from (a claim cannot, yet)."""
        return self is not RecordState.CLAIM


@dataclass(frozen=True, slots=True)
class Sighting:
    """One provider record a lookup returned."""

    node_id: bytes
    address: PeerKey  # where its registry answers
    state: RecordState


def _rendezvous(requester: bytes, provider: bytes, key: str) -> bytes:
    return hashlib.sha256(requester + b"\x00" + provider + b"\x00" + key.encode()).digest()


def rank_providers(requester: bytes, key: str, sightings: Iterable[Sighting]) -> list[Sighting]:
    """Sources among `sightings`, best first: complete before inflight, then rendezvous order."""
    sources = [s for s in sightings if s.state.is_source]
    return sorted(
        sources,
        key=lambda s: (
            s.state is not RecordState.COMPLETE,
            _rendezvous(requester, s.node_id, key),
        ),
    )


class BusyPeers:
    """Providers that answered busy, until their Retry-After passes (at most `max_entries`;
    the least recently added or asked about go first)."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._now = 0.0  # the caller's clock, as of the last call (the cache's timer reads it)
        # each entry's value is its own expiry time
        self._until: TLRUCache[PeerKey, float] = TLRUCache(
            maxsize=max_entries, ttu=lambda _peer, until, _now: until, timer=lambda: self._now
        )

    def add(self, peer: PeerKey, until: float) -> None:
        self._until[peer] = until

    def busy(self, peer: PeerKey, now: float) -> bool:
        self._now = now
        return peer in self._until

    def until(self, peer: PeerKey) -> float | None:
        """When `peer` stops being busy (None: not busy as of the last call)."""
        return self._until.get(peer)


class UploadSlots:
    """A provider's uploads in progress, bounded by `limit` (0: unbounded).

    One exception keeps every blob moving: an upload of a key nobody is uploading right now is
    always admitted.  Otherwise the first node of a burst (often the claimant of every layer of an
    image) fills its slots with the first layer asked for and no tree ever starts for the others.
    So at most `limit` + (number of distinct keys being uploaded) at once.

    And a node whose uplink cannot keep up says busy early: `lagging` is true when one of its
    uploads of an inflight blob has fallen behind the bytes its own ingest already holds (an
    upload that keeps up waits for the ingest to grow; one that lags is limited by this node's
    uplink).  A new upload would only slow the ones running, and through them their subtrees.
    """

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("upload limit must be >= 0")
        self.limit = limit
        self.active = 0
        self.refused = 0
        self._per_key: dict[str, int] = {}

    def try_acquire(self, key: str, *, lagging: bool = False) -> bool:
        """Take a slot for an upload of `key`; False (and count a refusal) when busy."""
        full = (self.limit and self.active >= self.limit) or lagging
        if full and self._per_key.get(key, 0) > 0:
            self.refused += 1
            return False
        self.active += 1
        self._per_key[key] = self._per_key.get(key, 0) + 1
        return True

    def release(self, key: str) -> None:
        count = self._per_key.get(key, 0)
        if count <= 0:
            raise RuntimeError("upload slot released more often than taken")
        self.active -= 1
        if count == 1:
            del self._per_key[key]
        else:
            self._per_key[key] = count - 1
