"""Peers slow to answer (`registry.mirror.peer_race.SlowPeers`, a cachetools cache on the caller's
clock): remembered for their ttl, cleared by an answer, bounded."""

from __future__ import annotations

from registry.interfaces import Peer
from registry.mirror.peer_race import SlowPeers


def test_slow_peers_last_their_ttl_and_an_answer_clears_them() -> None:
    slow = SlowPeers(ttl=10.0, max_peers=2)
    a, b, c = (Peer(bytes([i]) * 32, f"10.0.0.{i}", 5000) for i in (1, 2, 3))
    slow.lost(a, 0.0)
    assert slow.is_slow(a, 9.9) and not slow.is_slow(a, 10.0)
    slow.lost(a, 20.0)
    slow.answered(a)
    assert not slow.is_slow(a, 21.0)
    slow.lost(a, 30.0)
    slow.lost(b, 30.0)
    slow.lost(c, 30.0)  # over the bound: the oldest goes
    assert not slow.is_slow(a, 31.0) and slow.is_slow(b, 31.0) and slow.is_slow(c, 31.0)
