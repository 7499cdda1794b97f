"""The settle window where every lookup asks every node: one first lookup, still one claimant.

A claim is in its claimant's own store from the moment it is published, and where lookups ask
every node (a cluster of fewer than k nodes) the next lookup of anyone sees it there.  So the
window after a claim needs to cover one first lookup of the other claimants, not three (the
announce to the storers that a bigger cluster waits for).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

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
)
from registry.burst.provider_choice import RecordState, Sighting
from tests.registry.burst.claim_kit import node

KEY = "sha256:" + "ab" * 32
S = ClaimSettings()


def test_where_lookups_reach_every_node_the_settle_is_one_first_lookup() -> None:
    w = ProviderWait(node(1), KEY, 0.0, S, lookups_reach_all=True)
    assert w.step(0.0) == Wait(pytest.approx(0.020))
    w.round_ended(0.060)  # a loaded node: the first lookup took 60 ms
    assert w.step(0.060) == PublishClaim()
    assert w.step(0.060) == Wait(pytest.approx(0.120))  # 60 ms, not 180 ms
    assert w.step(0.120) == Resolve()
    w.round_ended(0.180)
    step = w.step(0.180)
    assert isinstance(step, Miss) and step.claimant


def test_elsewhere_the_settle_stays_three_first_lookups() -> None:
    w = ProviderWait(node(1), KEY, 0.0, S)
    w.round_ended(0.060)
    assert w.step(0.060) == PublishClaim()
    assert w.step(0.060) == Wait(pytest.approx(0.240))


def test_the_settle_window_keeps_its_floor_and_cap() -> None:
    assert S.settle_for(0.001, True) == S.settle
    assert S.settle_for(5.0, True) == S.settle_max
    assert S.settle_for(0.05, True) < S.settle_for(0.05, False)


@dataclass
class _Node:
    wait: ProviderWait
    lookup: float  # how long each of its lookups takes (network and its own scheduling)
    generation: int = 0  # the lookup in progress (a Resolve replaces the one before)
    snapshot: list[Sighting] = field(default_factory=list)
    outcome: Fetch | Miss | None = None


def claimants_of_a_burst(arrivals: list[float], lookups: list[float], reach_all: bool) -> int:
    """Nodes miss one key at `arrivals`.  Every lookup asks every node: it reads their stores
    halfway through (its queries arriving) and reports at its end, node i's lookups taking
    `lookups[i]`; a published record is in its node's store at once.  How many went upstream."""
    records: dict[bytes, RecordState] = {}
    nodes = [
        _Node(ProviderWait(node(i + 1), KEY, t, S, lookups_reach_all=reach_all), lookups[i])
        for i, t in enumerate(arrivals)
    ]
    events: list[tuple[float, int, str, int, int]] = []  # time, seq, kind, node, generation
    seq = 0

    def push(at: float, kind: str, i: int, generation: int = 0) -> None:
        nonlocal seq
        heapq.heappush(events, (at, seq, kind, i, generation))
        seq += 1

    def start_lookup(i: int, now: float) -> None:
        n = nodes[i]
        n.generation += 1
        push(now + n.lookup / 2, "read", i, n.generation)
        push(now + n.lookup, "report", i, n.generation)

    for i, t in enumerate(arrivals):
        start_lookup(i, t)
        push(t, "step", i)
    steps = 0
    while events:
        now, _, kind, i, generation = heapq.heappop(events)
        n = nodes[i]
        if n.outcome is not None:
            continue
        if kind == "read":
            if generation == n.generation:
                n.snapshot = [
                    Sighting(who, (who.hex(), 1), state) for who, state in records.items()
                ]
            continue
        if kind == "report":
            if generation != n.generation:
                continue
            for s in n.snapshot:
                n.wait.seen(s)
            n.wait.round_ended(now)
        while True:
            steps += 1
            assert steps < 200_000
            step = n.wait.step(now)
            if isinstance(step, PublishClaim):
                records[n.wait.requester] = RecordState.CLAIM
            elif isinstance(step, WithdrawClaim):
                records.pop(n.wait.requester, None)
            elif isinstance(step, Resolve):
                start_lookup(i, now)
            elif isinstance(step, Wait):
                assert step.until > now
                push(step.until, "step", i)
                break
            else:
                n.outcome = step
                break
    assert all(n.outcome is not None for n in nodes)
    return sum(1 for n in nodes if isinstance(n.outcome, Miss) and n.outcome.claimant)


@pytest.mark.parametrize("reach_all", [True, False])
@settings(max_examples=300, deadline=None)
@given(
    moments=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=10),
    base=st.floats(0.001, 0.03),
    spread=st.lists(st.floats(1.0, 2.0), min_size=10, max_size=10),
)
def test_a_burst_elects_one_claimant(
    reach_all: bool, moments: list[float], base: float, spread: list[float]
) -> None:
    """Nodes as loaded as each other (lookups within 2x) miss one key within one lookup of each
    other; lookups up to three attempts long, so the first often converges after the claim went
    out (within the three-lookup window that lets it converge).  Exactly one goes upstream, with
    the one-lookup window as with the three-lookup one."""
    lookups = [base * f for f in spread[: len(moments)]]
    arrivals = [m * base for m in moments]
    assert claimants_of_a_burst(arrivals, lookups, reach_all) == 1
