"""Verification policy: what the mirror trusts from peers, and what a peer that lied costs it.

Why its own module: the rules are few but they decide safety; the forwarder applies them.

Verification: a manifest body is read whole and hashed before its first byte is sent.  A blob of
up to `verify_first_max` (64 MiB), when the agent's buffer memory (`buffer_memory`) has room for
it, is fetched whole (resuming across peers), hashed, and only then
sent: a lying peer costs a fail-over to the next one, or a clean 404, never bad bytes.  (Streaming
with only the last byte held back is not enough for containerd: it resumes a cut-off body with a
Range request, from us or from upstream, and stitches the bad prefix to good bytes.)  A bigger blob
streams, hashed from byte 0 as it goes, with the final byte held back until the digest is
checked; on a mismatch the response is cut short.  So does a blob of any size from an in-flight
provider (one still downloading it: its bytes come as they reach it, and holding them would stop
this node's containerd from writing its own download, which peers may be reading in turn); such a
body may pause up to `inflight_stall_timeout`.  Either way every peer that contributed to bad
content is quarantined for that digest (for a multi-peer blob only the one whose bytes do not fit).

Client ranges (containerd resuming a cut download): the answer is verified like a whole blob.  The
blob is read from byte 0 and hashed in full; only the requested slice is passed on, its last byte
after the digest matched (small blobs: nothing before the digest matched).  Bytes before the range
cost a transfer but no client bandwidth, and a blob of at least `multi_peer_min` with several
providers has that prefix fetched from them in parallel (`registry.mirror.multi_peer`).  Trusting a
resumed range without its prefix would let one lying peer poison a download that containerd
stitches together.
"""

from __future__ import annotations

import logging
import mmap
import time
from collections.abc import Iterable

from registry.burst.attempts import peer_key
from registry.events import MirrorEvents, PeerQuarantined
from registry.interfaces import Peer
from registry.metrics import PEER_QUARANTINED, registry_label
from registry.mirror.buffers import BufferPool
from registry.mirror.peer_answer import PeerAnswer, Quarantine
from registry.oci.reference import sha256_digest

__all__ = ["VerificationPolicy", "peer_address"]

logger = logging.getLogger("registry.mirror.forwarder")  # one name for the mirror path's lines


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
            PEER_QUARANTINED.labels(registry_label(registry)).inc()
            self.events.emit(PeerQuarantined(time.time(), digest, peer_address(peer), registry))
            logger.warning(
                "peer served content not matching its digest; quarantined",
                extra={"peer": peer_address(peer), "digest": digest},
            )
