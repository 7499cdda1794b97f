"""Supervision under a mock clock: restart with backoff, readiness once, give up when crashing."""

from __future__ import annotations

import itertools

import pytest
import trio

from agent.runtime.supervise import CrashBudget, RestartPolicy, ServiceFailed, Supervisor


def test_crash_budget_backoff_and_window() -> None:
    budget = CrashBudget(
        RestartPolicy(initial_backoff=0.5, max_backoff=4.0, max_restarts=5, window=100.0)
    )
    assert [budget.record_crash(t) for t in (0, 1, 2, 3)] == [0.5, 1.0, 2.0, 4.0]
    assert budget.record_crash(4) == 4.0  # capped
    assert budget.record_crash(5) is None  # sixth crash inside the window
    fresh = CrashBudget(RestartPolicy(max_restarts=1, window=10.0))
    assert fresh.record_crash(0) is not None
    assert fresh.record_crash(20) is not None  # the old crash left the window


async def test_restarts_with_backoff_and_reports_ready_once(autojump_clock: trio.abc.Clock) -> None:
    starts: list[float] = []

    async def flaky(*, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        starts.append(trio.current_time())
        task_status.started(f"ready-{len(starts)}")
        if len(starts) < 3:
            await trio.sleep(1)
            raise OSError("containerd went away")
        await trio.sleep_forever()

    sup = Supervisor(RestartPolicy(initial_backoff=0.5, max_backoff=30, max_restarts=5, window=60))
    async with trio.open_nursery() as nursery:
        value = await nursery.start(sup.run, "state", flaky)
        assert value == "ready-1"
        await trio.sleep(10)
        assert len(starts) == 3
        assert [round(b - a, 3) for a, b in itertools.pairwise(starts)] == [1.5, 2.0]
        assert sup.states["state"] == "running" and sup.restarts["state"] == 2
        nursery.cancel_scope.cancel()


async def test_keeps_crashing_raises_service_failed(autojump_clock: trio.abc.Clock) -> None:
    attempts = 0

    async def broken(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal attempts
        attempts += 1
        raise RuntimeError("bad config")

    sup = Supervisor(RestartPolicy(initial_backoff=0.1, max_restarts=3, window=60))
    with pytest.raises(ServiceFailed) as exc:
        await sup.run("dht", broken)
    assert exc.value.name == "dht" and attempts == 4
    assert sup.states["dht"] == "failed"


async def test_cancellation_is_not_a_crash(autojump_clock: trio.abc.Clock) -> None:
    async def forever(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    sup = Supervisor()
    with trio.move_on_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run, "metrics", forever)
    assert sup.restarts["metrics"] == 0
