"""The idle heap trimmer: trims once per quiet spell after activity, never while requests arrive."""

from __future__ import annotations

import trio
import trio.testing

from agent.runtime.memory_trim import IdleTrim, glibc_malloc_trim, resident_bytes, trim_when_idle


def test_trims_once_after_a_quiet_spell() -> None:
    policy = IdleTrim(quiet_s=5.0)
    assert not policy.observe(0.0, 10)
    assert not policy.observe(4.9, 10)  # not quiet long enough
    assert policy.observe(5.0, 10)
    assert not policy.observe(6.0, 10)  # already trimmed for this count
    assert not policy.observe(600.0, 10)


def test_never_trims_while_requests_keep_arriving() -> None:
    policy = IdleTrim(quiet_s=5.0)
    decisions = [policy.observe(float(t), t // 2) for t in range(60)]  # a new request every 2 s
    assert not any(decisions)


def test_a_new_burst_earns_a_new_trim() -> None:
    policy = IdleTrim(quiet_s=5.0)
    assert not policy.observe(0.0, 1)
    assert policy.observe(5.0, 1)
    assert not policy.observe(6.0, 2)  # a request: the quiet spell starts again
    assert not policy.observe(10.0, 2)
    assert policy.observe(11.0, 2)


async def test_driver_trims_after_the_burst_ends(autojump_clock: trio.testing.MockClock) -> None:
    seen = 0
    trims: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: trim_when_idle(
                lambda: seen, trim=lambda: trims.append(trio.current_time()), quiet_s=5.0
            )
        )
        for _ in range(20):  # a request every 0.5 s for 10 s
            seen += 1
            await trio.sleep(0.5)
        assert trims == []  # requests kept arriving
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    assert len(trims) == 1
    assert 10.0 + 5.0 <= trims[0] <= 10.0 + 5.0 + 1.0 + 1e-6


async def test_without_glibc_the_driver_returns() -> None:
    with trio.fail_after(1):
        await trim_when_idle(lambda: 0, trim=None)


def test_glibc_trim_runs_here() -> None:
    trim = glibc_malloc_trim()
    assert trim is not None  # this project's images and CI are Debian (glibc)
    trim()
    assert resident_bytes() > 0
