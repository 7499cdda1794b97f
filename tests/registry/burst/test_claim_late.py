"""A late claim (one that went out after a fast claimant's settle lookup asked us) confirms before
it wins: the burst timeline that sent one layer upstream twice, as pure state-machine steps."""

from __future__ import annotations

import pytest

from registry.burst.claim import (
    ClaimSettings,
    Fetch,
    Miss,
    ProviderWait,
    PublishClaim,
    Resolve,
    Step,
    Wait,
    WithdrawClaim,
    claim_rank,
)
from registry.burst.provider_choice import RecordState, Sighting
from tests.registry.burst.claim_kit import node, sighting

KEY = "sha256:" + "ab" * 32
S = ClaimSettings()


def ranked_pair() -> tuple[int, int]:
    """(lower rank, higher rank) among two node numbers for KEY."""
    low, high = sorted((3, 7), key=lambda i: claim_rank(node(i), KEY))
    return low, high


def claim(i: int, state: RecordState = RecordState.CLAIM) -> Sighting:
    return sighting(i, state)


def fast_claimant(i: int) -> ProviderWait:
    """A: its first lookup converges in 4 ms (asking B before B's claim exists), its claim goes
    out at once, its settle lookup at 24 ms asks B before B's claim is out: it wins alone."""
    a = ProviderWait(node(i), KEY, 0.0, S, lookups_reach_all=True)
    assert a.step(0.0) == Wait(pytest.approx(0.020))
    a.round_ended(0.004)
    assert a.step(0.004) == PublishClaim()
    assert a.step(0.004) == Wait(pytest.approx(0.024))
    assert a.step(0.024) == Resolve()
    a.round_ended(0.027)
    won = a.step(0.027)
    assert isinstance(won, Miss) and won.claimant
    return a


def late_claimant(i: int, rival: Sighting) -> ProviderWait:
    """B: starts 1 ms after A, its lookup asks A before A's claim is out and does not converge
    within the attempt; its loop runs 6 ms late, so its claim goes out at 27 ms (after A's
    settle lookup asked it).  Its first lookup converges at 45 ms; its settle lookup sees A's
    claim (A's ingest is not advertised yet)."""
    b = ProviderWait(node(i), KEY, 0.001, S, lookups_reach_all=True)
    assert b.step(0.001) == Wait(pytest.approx(0.021))
    assert b.step(0.027) == PublishClaim()
    b.round_ended(0.045)
    t = 0.045
    while True:
        step = b.step(t)
        if isinstance(step, Resolve):
            break
        assert isinstance(step, Wait)
        t = step.until
    b.seen(rival)
    b.round_ended(t + 0.003)
    return b


def run_until_decided(
    b: ProviderWait, t: float, a_record: Sighting | None, until: float = 2.0
) -> tuple[Step, float]:
    """Step B, answering each lookup with `a_record` (None: A's claim was withdrawn)."""
    while t < until:
        step = b.step(t)
        if isinstance(step, Wait):
            t = step.until
        elif isinstance(step, Resolve):
            if a_record is not None:
                b.seen(a_record)
            b.round_ended(t + 0.003)
            t += 0.003
        else:
            return step, t
    raise AssertionError("B did not decide")


def test_a_late_lower_ranked_claim_defers_to_a_claimant_that_decided_without_it() -> None:
    low, high = ranked_pair()
    fast_claimant(high)  # A (higher rank) is a claimant: it never saw B's claim
    b = late_claimant(low, claim(high))
    step, t = run_until_decided(b, 0.048, claim(high))
    # B would win on rank, but A's claim still stands once every claim of its time is decided
    assert step == WithdrawClaim(), step
    assert t <= 0.001 + S.budget + 2 * (S.settle_max + S.budget)
    assert b.waited_on == node(high)
    # A's ingest appears: B streams from it instead of going upstream a second time
    step, _ = run_until_decided(b, t, claim(high, RecordState.INFLIGHT))
    assert step == Fetch(claim(high, RecordState.INFLIGHT))


def test_a_late_claim_wins_once_the_others_withdraw() -> None:
    """The other claimant saw ours and deferred (withdrew): the late claim is the claimant after
    one more look, a poll later."""
    low, high = ranked_pair()
    b = late_claimant(low, claim(high))
    step, t = run_until_decided(b, 0.048, None)
    assert isinstance(step, Miss) and step.claimant
    assert t <= 0.048 + S.poll + 0.01


def test_an_on_time_claim_still_wins_at_once_against_other_claims() -> None:
    """Claims that went out within `settle` of the lookup's start are decided by rank as before."""
    low, high = ranked_pair()
    b = ProviderWait(node(low), KEY, 0.0, S, lookups_reach_all=True)
    b.round_ended(0.002)
    assert b.step(0.002) == PublishClaim()
    assert b.step(0.002) == Wait(pytest.approx(0.022))
    assert b.step(0.022) == Resolve()
    b.seen(claim(high))
    b.round_ended(0.025)
    won = b.step(0.025)
    assert isinstance(won, Miss) and won.claimant
