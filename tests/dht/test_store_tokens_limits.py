"""Provider records expire one by one; tokens rotate; floods are limited; keys announce in a paced
queue."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dht.announce import AnnounceSchedule
from dht.ids import ProviderInfo, RecordState
from dht.providers import ProviderStore
from dht.ratelimit import SourceLimiter, TokenBucket
from dht.tokens import TokenIssuer

KEY = b"k" * 32


def provider(n: int) -> ProviderInfo:
    return ProviderInfo(bytes([n]) * 32, f"10.0.0.{n}", 5000)


def test_each_record_expires_on_its_own() -> None:
    store = ProviderStore()
    store.add(KEY, provider(1), 100.0)
    store.add(KEY, provider(2), 200.0)
    assert len(store.get(KEY, 50.0)) == 2
    assert store.get(KEY, 150.0) == [provider(2)]  # reads never return expired records
    assert store.expire(150.0) == 1
    assert len(store) == 1
    store.add(KEY, provider(2), 400.0)  # a refresh extends the record
    assert store.expire(300.0) == 0
    assert store.get(KEY, 300.0) == [provider(2)]
    assert store.expire(400.0) == 1
    assert len(store) == 0 and store.get(KEY, 0.0) == []


@given(
    st.lists(st.tuples(st.integers(1, 40), st.floats(0, 1000)), max_size=200), st.floats(0, 1000)
)
def test_expiry_property(adds: list[tuple[int, float]], now: float) -> None:
    store = ProviderStore()
    latest: dict[int, float] = {}
    for n, expires in adds:
        store.add(KEY, provider(n), expires)
        latest[n] = expires
    store.expire(now)
    alive = {n for n, e in latest.items() if e > now}
    assert {p.node_id[0] for p in store.get(KEY, now)} == alive
    assert len(store) == len(alive)


def test_store_is_bounded() -> None:
    store = ProviderStore(max_per_key=3, max_records=5)
    assert all(store.add(KEY, provider(n), 10.0) for n in range(3))
    assert not store.add(KEY, provider(9), 10.0)
    assert store.add(b"j" * 32, provider(1), 10.0)
    assert store.add(b"j" * 32, provider(2), 10.0)
    assert not store.add(b"i" * 32, provider(1), 10.0)
    assert len(store) == 5 and store.refused == 2


def test_tokens_are_bound_to_the_ip_and_rotate() -> None:
    issuer = TokenIssuer(random.Random(1).randbytes, rotate_every=300.0)
    token = issuer.issue("10.0.0.1", 0.0)
    assert issuer.check("10.0.0.1", token, 10.0)
    assert not issuer.check("10.0.0.2", token, 10.0)
    assert not issuer.check("10.0.0.1", b"forged!!", 10.0)
    assert issuer.check("10.0.0.1", token, 350.0)  # previous secret still accepted
    assert not issuer.check("10.0.0.1", token, 700.0)  # two rotations later it is not


def test_source_limiter() -> None:
    limiter = SourceLimiter(rate=10.0, burst=5.0, max_sources=3)
    assert all(limiter.allow("a", 0.0) for _ in range(5))
    assert not limiter.allow("a", 0.0)
    assert limiter.allow("b", 0.0)  # others are unaffected
    assert limiter.allow("a", 0.1)  # refilled at `rate`
    for s in "cdefg":
        limiter.allow(s, 0.0)
    assert len(limiter) == 3  # bounded memory


def test_announce_schedule_queues_reschedules_and_forgets() -> None:
    sched = AnnounceSchedule(refresh=100.0, rng=random.Random(1), jitter=0.1)
    assert sched.add(b"a" * 32, "a") and not sched.add(b"a" * 32, "a")
    sched.add(b"b" * 32, "b")
    assert sched.pop_queued() == b"a" * 32
    sched.reschedule(b"a" * 32, 0.0)
    due = sched.next_due()
    assert due is not None and 90.0 <= due <= 100.0
    sched.remove(b"b" * 32)
    assert sched.pop_queued() is None
    sched.release_due(due)
    assert sched.pop_queued() == b"a" * 32


def test_claims_and_downloads_jump_the_announce_queue() -> None:
    """A burst decides on claim and in-flight records within tens of milliseconds: they must not
    wait behind keys queued for their first announce."""
    sched = AnnounceSchedule(refresh=100.0, rng=random.Random(1), jitter=0.1)
    for i in range(5):
        sched.add(bytes([i]) * 32, f"k{i}")
    sched.add(b"c" * 32, "claimed", RecordState.CLAIM)
    sched.add(b"\x03" * 32, "k3", RecordState.INFLIGHT)  # queued already: moved to the front
    assert sched.pop_queued() == b"\x03" * 32
    assert sched.pop_queued() == b"c" * 32
    assert [sched.pop_queued() for _ in range(4)] == [bytes([i]) * 32 for i in (0, 1, 2, 4)]
    assert sched.pop_queued() is None


def test_announce_pacer_allows_a_burst_then_the_rate_and_always_moves_time_forward() -> None:
    pacer = TokenBucket(rate=50.0, burst=5.0)
    assert sum(pacer.take(0.0) for _ in range(10)) == 5
    later = pacer.next_token_at(0.0)
    assert later == pytest.approx(0.02) and not pacer.take(later - 0.001)
    assert pacer.take(later)
    # a refill that lands a hair under one token must still point strictly into the future
    now = 1e6
    pacer = TokenBucket(rate=3.0, burst=1.0)
    assert pacer.take(now)
    assert pacer.next_token_at(now) > now
