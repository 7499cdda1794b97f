"""bench.lookup_hops on a small load: its scenarios run over real loopback nodes and count passes.

The pass counts are the bench's figures (printed, not asserted), except the two that are rules of
the code: an uncontended claim is one pass (the Router's one checkpoint), a provider whose record
is held is handed out without a pass, and a watched claimed miss takes fewer passes than the same
miss with its lookups iterated by a task.
"""

from __future__ import annotations

from bench.lookup_hops import Passes, scenarios


async def test_the_scenarios_run_and_count_passes() -> None:
    out = await scenarios(busy=20, runs=3)
    assert out["has_push_face"]
    for mode in ("pushed", "pulled"):
        assert set(out[mode]) == {"plain_miss", "plain_known", "claim_publish", "claim_miss"}
        assert out[mode]["claim_publish"]["passes"] == 1
        assert out[mode]["plain_known"]["passes"] == 0  # a provider already here: no yield
        assert out[mode]["claim_miss"]["passes"] > out[mode]["plain_miss"]["passes"] > 0
    assert out["pushed"]["claim_miss"]["passes"] < out["pulled"]["claim_miss"]["passes"]


def test_a_pass_is_one_io_poll() -> None:
    passes = Passes()
    passes.before_io_wait(0.0)
    passes.before_io_wait(1.0)
    assert passes.count == 2
