"""Verification policy: what the mirror trusts from peers, and what a peer that lied costs it.

Why its own module: the rules are few but they decide safety.  A manifest is read whole and hashed
before a byte goes out (and is never bigger than `max_manifest_size`).  A blob of up to
`verify_first_max` is held whole and hashed first, when the agent's buffer pool has room for it
(`registry.buffers`: the same capped memory streaming reads use); a bigger one streams with its
last byte held back (`registry.blob_stream`).  Every peer that contributed to content not
matching its digest is quarantined for that digest.
"""

from __future__ import annotations

import logging
import mmap
import time
from collections.abc import Iterable

from registry.buffers import BufferPool
from registry.events import MirrorEvents, PeerQuarantined
from registry.interfaces import Peer
from registry.metrics import PEER_QUARANTINED
from registry.mirror import PeerAnswer, Quarantine, peer_key
from registry.reference import sha256_digest

__all__ = ["VerificationPolicy", "peer_address"]

logger = logging.getLogger("registry.forwarder")  # the name these lines have always had


def peer_address(peer: Peer) -> str:
    return f"{peer.host}:{peer.port}"


class VerificationPolicy:
    """Decides how a peer's content is checked; quarantines the peers whose content failed."""

    def __init__(
        self,
        quarantine: Quarantine,
        buffers: BufferPool,
        *,
        verify_first_max: int,
        max_manifest_size: int,
        events: MirrorEvents,
    ) -> None:
        self.events = events
        self.quarantine = quarantine
        self.buffers = buffers
        self.verify_first_max = verify_first_max
        self.max_manifest_size = max_manifest_size

    def avoided(self, digest: str | None) -> frozenset[tuple[str, int]]:
        """Peers not to ask for `digest` (they served bad content for it)."""
        return self.quarantine.peers(digest) if digest else frozenset()

    def manifest_too_big(self, answer: PeerAnswer) -> bool:
        return answer.size > self.max_manifest_size

    def manifest_matches(self, body: bytes, answer: PeerAnswer) -> bool:
        return len(body) == answer.size and sha256_digest(body) == answer.digest

    def hold_whole(self, size: int) -> list[mmap.mmap] | None:
        """Buffers for all of a blob verified before sending (give back unused ones); None when
        it streams instead (too big, or the pool has no room for it now)."""
        if size > self.verify_first_max:
            return None
        return self.buffers.reserve(-(-size // self.buffers.buffer_size))

    def punish(self, digest: str, peers: Iterable[Peer], registry: str) -> None:
        for peer in peers:
            self.quarantine.add(digest, peer_key(peer))
            PEER_QUARANTINED.labels(registry).inc()
            self.events.emit(PeerQuarantined(time.time(), digest, peer_address(peer), registry))
            logger.warning(
                "peer served content not matching its digest; quarantined",
                extra={"peer": peer_address(peer), "digest": digest},
            )
