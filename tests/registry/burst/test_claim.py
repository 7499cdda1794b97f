"""The claim protocol's pure state machine: one claimant per burst, bounded waits, no deadlock."""

from __future__ import annotations

import heapq

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry.burst.claim import (
    ClaimSettings,
    Fetch,
    Miss,
    ProviderWait,
    PublishClaim,
    Resolve,
    Wait,
    WithdrawClaim,
    claim_rank,
)
from registry.burst.provider_choice import (
    BusyPeers,
    RecordState,
    Sighting,
    UploadSlots,
    rank_providers,
)
from tests.registry.burst.claim_kit import node, sighting

KEY = "sha256:" + "cd" * 32
S = ClaimSettings()


def test_a_source_found_in_the_first_attempt_is_fetched() -> None:
    w = ProviderWait(node(1), KEY, 0.0, S)
    assert w.step(0.0) == Wait(pytest.approx(0.020))
    w.seen(sighting(2, RecordState.INFLIGHT))
    assert w.step(0.003) == Fetch(sighting(2, RecordState.INFLIGHT))


def test_a_lone_miss_claims_and_answers_within_the_resolve_budget() -> None:
    w = ProviderWait(node(1), KEY, 0.0, S)
    w.round_ended()  # converged at once: nobody has it, nobody claimed it
    assert w.step(0.002) == PublishClaim()
    assert w.step(0.002) == Wait(pytest.approx(0.022))  # settle
    assert w.step(0.022) == Resolve()
    w.round_ended()
    step = w.step(0.024)
    assert isinstance(step, Miss) and step.claimant


def test_a_lookup_that_never_converges_still_decides_soon() -> None:
    """A lookup slower than an attempt stretches the settle window (3 lookups, capped), so the
    decision comes a little after the budget, never unbounded."""
    w = ProviderWait(node(1), KEY, 0.0, S)
    assert w.step(0.0) == Wait(pytest.approx(0.020))
    assert w.step(0.020) == PublishClaim()
    assert w.step(0.020) == Wait(pytest.approx(0.080))  # settle: 3 x the 20 ms lookup
    assert w.step(0.080) == Resolve()
    assert w.step(0.081) == Wait(pytest.approx(0.100))  # the second lookup gets an attempt
    step = w.step(0.100)
    assert isinstance(step, Miss) and step.claimant
    assert 0.100 <= S.budget + S.settle_max


def test_simultaneous_claims_pick_the_lowest_rank() -> None:
    a, b = 3, 9
    if claim_rank(node(a), KEY) > claim_rank(node(b), KEY):
        a, b = b, a
    high, low = ProviderWait(node(b), KEY, 0.0, S), ProviderWait(node(a), KEY, 0.001, S)
    for w, t in ((high, 0.002), (low, 0.003)):
        w.round_ended()
        assert w.step(t) == PublishClaim()
    assert high.step(0.022) == Resolve()
    assert low.step(0.023) == Resolve()
    high.seen(sighting(a, RecordState.CLAIM))
    low.seen(sighting(b, RecordState.CLAIM))
    high.round_ended()
    low.round_ended()
    assert high.step(0.024) == WithdrawClaim()
    won = low.step(0.025)
    assert isinstance(won, Miss) and won.claimant
    # the loser waits for the winner's ingest and streams from it as soon as it is advertised
    assert high.step(0.024) == Wait(pytest.approx(0.124))
    assert high.step(0.124) == Resolve()
    high.seen(sighting(a, RecordState.INFLIGHT))
    assert high.step(0.126) == Fetch(sighting(a, RecordState.INFLIGHT))


def test_the_layers_of_an_image_get_different_claimants() -> None:
    nodes = [node(i) for i in range(1, 30)]
    winners = {min(nodes, key=lambda n: claim_rank(n, f"sha256:{k:064x}")) for k in range(8)}
    assert len(winners) >= 4


def test_a_seen_claim_makes_a_waiter_that_gives_up_at_the_deadline() -> None:
    w = ProviderWait(node(5), KEY, 0.0, S)
    w.seen(sighting(7, RecordState.CLAIM))
    w.round_ended()
    now = 0.002
    step = w.step(now)
    rounds = 0
    while not isinstance(step, Miss):
        if isinstance(step, Wait):
            assert step.until > now
            now = step.until
        elif isinstance(step, Resolve):
            rounds += 1
            w.seen(sighting(7, RecordState.CLAIM))  # the claim stands, its ingest never appears
            w.round_ended()
        else:
            raise AssertionError(step)
        step = w.step(now)
    assert now == pytest.approx(0.002 + S.ingest_wait)
    assert not step.claimant and step.waited_on == node(7)
    assert 50 <= rounds <= 110  # polls every 100 ms, not a busy loop


def test_a_claim_that_vanishes_ends_the_wait_at_once() -> None:
    w = ProviderWait(node(5), KEY, 0.0, S)
    w.seen(sighting(7, RecordState.CLAIM))
    w.round_ended()
    wait = w.step(0.002)
    assert wait == Wait(pytest.approx(0.102))
    assert isinstance(wait, Wait) and w.step(wait.until) == Resolve()
    w.round_ended()  # no claim, no provider: the claimant's containerd got it elsewhere or failed
    step = w.step(0.104)
    assert isinstance(step, Miss) and not step.claimant


def test_distrusted_claims_are_ignored() -> None:
    w = ProviderWait(node(5), KEY, 0.0, S, distrusted_claims=frozenset({node(7)}))
    w.seen(sighting(7, RecordState.CLAIM))
    w.round_ended()
    assert w.step(0.002) == PublishClaim()


def test_busy_providers_are_skipped_then_retried_after_retry_after() -> None:
    w = ProviderWait(node(1), KEY, 0.0, S)
    a, b = sighting(2, RecordState.COMPLETE), sighting(3, RecordState.COMPLETE)
    w.seen(a)
    w.seen(b)
    first = w.step(0.001)
    assert isinstance(first, Fetch)
    w.busy(first.sighting.address, 0.5, 0.002)
    second = w.step(0.002)
    assert isinstance(second, Fetch) and second.sighting != first.sighting
    w.busy(second.sighting.address, 0.5, 0.003)
    w.round_ended()
    wait = w.step(0.003)
    assert wait == Wait(pytest.approx(0.103))  # both busy: wait, do not claim, do not 404
    assert isinstance(wait, Wait) and w.step(wait.until) == Resolve()
    w.seen(a)
    w.seen(b)
    w.round_ended()
    wait = w.step(0.105)
    assert wait == Wait(pytest.approx(0.205))
    assert isinstance(wait, Wait)
    now = wait.until
    while True:
        step = w.step(now)
        if isinstance(step, Fetch):
            break
        if isinstance(step, Resolve):
            w.round_ended()
        elif isinstance(step, Wait):
            now = step.until
    assert now >= 0.5


def test_failed_sources_lead_to_a_claim_not_to_every_node_going_upstream() -> None:
    w = ProviderWait(node(1), KEY, 0.0, S)
    w.seen(sighting(2, RecordState.COMPLETE))
    step = w.step(0.001)
    assert isinstance(step, Fetch)
    w.exclude(step.sighting.address, 0.002)
    assert w.step(0.002) == Resolve()  # look again before giving up
    w.seen(sighting(2, RecordState.COMPLETE))
    w.round_ended()
    assert w.step(0.003) == PublishClaim()


def test_three_failed_fetches_end_the_request() -> None:
    w = ProviderWait(node(1), KEY, 0.0, S)
    for i in range(2, 6):
        w.seen(sighting(i, RecordState.INFLIGHT))
    now = 0.001
    for _ in range(S.resolve_retries):
        step = w.step(now)
        if isinstance(step, Resolve):
            w.round_ended()
            step = w.step(now)
        assert isinstance(step, Fetch)
        now += 5.0  # the stream stalled
        w.exclude(step.sighting.address, now)
    step = w.step(now)
    assert isinstance(step, Miss) and "retries" in step.reason


def test_a_source_during_settling_is_fetched_and_the_claim_kept_until_it_works() -> None:
    w = ProviderWait(node(1), KEY, 0.0, S)
    w.round_ended()
    assert w.step(0.001) == PublishClaim()
    w.seen(sighting(4, RecordState.INFLIGHT))
    step = w.step(0.010)
    assert step == Fetch(sighting(4, RecordState.INFLIGHT))
    # the source fails: the claim is decided as if it had never appeared
    w.exclude(sighting(4, RecordState.INFLIGHT).address, 0.011)
    assert w.step(0.011) == Resolve()
    w.round_ended()
    step = w.step(0.07)
    assert isinstance(step, Miss) and step.claimant


def test_rank_prefers_complete_then_spreads_by_requester() -> None:
    sources = [sighting(i, RecordState.INFLIGHT) for i in range(2, 12)]
    sources.append(sighting(20, RecordState.COMPLETE))
    sources.append(sighting(21, RecordState.CLAIM))
    firsts = set()
    for r in range(100, 140):
        ranked = rank_providers(node(r), KEY, sources)
        assert ranked[0].state is RecordState.COMPLETE
        assert all(s.state is not RecordState.CLAIM for s in ranked)
        firsts.add(ranked[1].node_id)
    assert len(firsts) >= 6  # requesters spread over the inflight providers


def test_upload_slots_and_busy_memory() -> None:
    slots = UploadSlots(2)
    assert slots.try_acquire("a") and slots.try_acquire("a")
    assert not slots.try_acquire("a") and slots.refused == 1
    assert slots.try_acquire("b")  # a key nobody uploads always gets one slot
    assert not slots.try_acquire("b")
    slots.release("a")
    slots.release("b")
    assert slots.try_acquire("a")
    with pytest.raises(RuntimeError):
        slots.release("c")
    assert UploadSlots(0).try_acquire("a")  # 0: unbounded
    lagging = UploadSlots(8)
    assert lagging.try_acquire("a", lagging=True)  # the first upload of a key always goes
    assert not lagging.try_acquire("a", lagging=True)  # an uplink behind its ingest: busy
    assert lagging.try_acquire("a", lagging=False)
    busy = BusyPeers(max_entries=2)
    busy.add(("a", 1), 1.0)
    assert busy.busy(("a", 1), 0.5) and not busy.busy(("a", 1), 1.0)


@settings(max_examples=200, deadline=None)
@given(
    arrivals=st.lists(st.floats(0.0, 0.5), min_size=1, max_size=12),
    ids=st.permutations(list(range(1, 13))),
    visible_after=st.floats(0.0005, 0.009),
    ingest_after=st.one_of(st.none(), st.floats(0.01, 2.0)),
)
def test_burst_never_deadlocks_and_elects_one_claimant(
    arrivals: list[float], ids: list[int], visible_after: float, ingest_after: float | None
) -> None:
    """Nodes miss one key at random moments; records become visible `visible_after` later (well
    under `settle`).  Exactly one claimant; the others fetch from its ingest once it is advertised,
    or, if it never is, answer 404 by the deadline."""
    history: list[tuple[float, bytes, RecordState | None]] = []
    events: list[tuple[float, int, int]] = []  # (time, seq, node index)
    waits = [ProviderWait(node(ids[i]), KEY, t, S) for i, t in enumerate(arrivals)]
    outcome: dict[int, Fetch | Miss] = {}
    seq = 0

    def publish(n: bytes, state: RecordState | None, at: float) -> None:
        history.append((at + visible_after, n, state))

    def visible(at: float) -> list[Sighting]:
        state: dict[bytes, RecordState | None] = {}
        for when, n, st_ in sorted(history, key=lambda h: h[0]):
            if when <= at:
                state[n] = st_
        return [Sighting(n, (n.hex(), 1), s) for n, s in state.items() if s is not None]

    for i, t in enumerate(arrivals):
        heapq.heappush(events, (t, seq, i))
        seq += 1
    steps = 0
    while events:
        now, _, i = heapq.heappop(events)
        w = waits[i]
        if i in outcome:
            continue
        if w.round_started == now or (now == w.started and not w.round_done):
            for s in visible(now):  # lookup results (a lookup takes no time here)
                w.seen(s)
            w.round_ended()
        while True:
            steps += 1
            assert steps < 100_000
            step = w.step(now)
            if isinstance(step, PublishClaim):
                publish(w.requester, RecordState.CLAIM, now)
            elif isinstance(step, WithdrawClaim):
                publish(w.requester, None, now)
            elif isinstance(step, Resolve):
                for s in visible(now):
                    w.seen(s)
                w.round_ended()
            elif isinstance(step, Wait):
                assert step.until > now
                heapq.heappush(events, (step.until, seq, i))
                seq += 1
                break
            else:
                outcome[i] = step
                if isinstance(step, Miss) and step.claimant and ingest_after is not None:
                    publish(w.requester, RecordState.INFLIGHT, now + ingest_after)
                if isinstance(step, Fetch):
                    assert step.sighting.state is RecordState.INFLIGHT
                break
    assert len(outcome) == len(waits)
    claimants = [i for i, o in outcome.items() if isinstance(o, Miss) and o.claimant]
    assert len(claimants) == 1
    for i, o in outcome.items():
        decided_by = waits[i].started + S.ingest_wait + S.poll
        assert isinstance(o, Fetch | Miss)
        if ingest_after is not None and ingest_after + 0.2 < S.ingest_wait and i not in claimants:
            assert isinstance(o, Fetch), (i, o)
        assert o is not None and decided_by > 0


def test_rollout_simulation_small_burst_fetches_one_upstream_copy() -> None:
    """The rollout bench drives these cores; a small burst must form a tree, not a star."""
    from bench.rollout import Params, Simulation

    result = Simulation(
        Params(nodes=40, image_gb=0.2, slow_fraction=0.0, dead_fraction=0.0, upload_limit=3)
    ).run()
    assert result["pulled"] == 40 and result["unfinished"] == 0
    assert result["upstream_copies"] <= 1.01
    assert result["claimants"] == 2  # one per layer
    assert result["max_depth"] >= 2  # receivers re-served: a tree
    assert result["p99_over_one_copy"] < 1.5


def test_only_layers_are_claimed_not_json_blobs() -> None:
    from registry.mirror.job import MirrorJob
    from registry.oci.distribution import parse_request_path

    request = parse_request_path(f"/v2/library/app/blobs/{KEY}", "docker.io")
    job = MirrorJob(request, "GET", None)  # type: ignore[arg-type]
    assert job.claimable  # no Accept: a plain client, claims as usual
    layer = "application/vnd.oci.image.layer.v1.tar+gzip, */*"
    config = "application/vnd.oci.image.config.v1+json, */*"
    docker_config = "application/vnd.docker.container.image.v1+json, */*"
    assert MirrorJob(request, "GET", None, accept=layer).claimable  # type: ignore[arg-type]
    assert not MirrorJob(request, "GET", None, accept=config).claimable  # type: ignore[arg-type]
    assert not MirrorJob(request, "GET", None, accept=docker_config).claimable  # type: ignore[arg-type]
