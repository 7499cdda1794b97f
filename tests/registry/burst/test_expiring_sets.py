"""The burst's expiring memories (cachetools caches on the caller's clock): entries expire at
their time, and the number kept is bounded."""

from __future__ import annotations

from registry.burst.claim_supply import DistrustedClaims
from registry.burst.provider_choice import BusyPeers


def test_busy_peers_expire_each_at_its_own_time_and_are_bounded() -> None:
    busy = BusyPeers(max_entries=2)
    busy.add(("a", 1), 1.0)
    busy.add(("b", 1), 3.0)
    assert busy.busy(("a", 1), 0.5) and busy.busy(("b", 1), 0.5)
    assert not busy.busy(("a", 1), 1.0) and busy.busy(("b", 1), 2.0)
    busy.add(("c", 1), 9.0)
    busy.add(("d", 1), 9.0)  # over the bound: the oldest goes
    assert not busy.busy(("b", 1), 2.0)
    assert busy.busy(("c", 1), 2.0) and busy.busy(("d", 1), 2.0)


def test_distrusted_claims_last_their_ttl_per_key_and_are_bounded() -> None:
    distrusted = DistrustedClaims(ttl=10.0, max_entries=2)
    distrusted.add("k", b"n1", 0.0)
    distrusted.add("other", b"n2", 1.0)
    assert distrusted.nodes("k", 5.0) == frozenset({b"n1"})
    assert distrusted.nodes("k", 10.0) == frozenset()  # expired
    distrusted.add("k", b"n3", 11.0)
    distrusted.add("k", b"n4", 11.0)
    distrusted.add("k", b"n5", 11.0)  # over the bound: the oldest goes
    assert distrusted.nodes("k", 12.0) == frozenset({b"n4", b"n5"})
