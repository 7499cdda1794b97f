"""Peer record states in the mirror's pure core: a claimant is never fetched from."""

from __future__ import annotations

from registry.burst.attempts import MirrorAttempts
from registry.interfaces import Peer, PeerState


def test_claims_are_not_usable_but_inflight_and_complete_are() -> None:
    attempts = MirrorAttempts("sha256:" + "ab" * 32, 3)
    assert attempts.usable(Peer(b"a" * 32, "10.0.0.1", 5000, PeerState.COMPLETE))
    assert attempts.usable(Peer(b"b" * 32, "10.0.0.2", 5000, PeerState.INFLIGHT))
    assert not attempts.usable(Peer(b"c" * 32, "10.0.0.3", 5000, PeerState.CLAIM))
