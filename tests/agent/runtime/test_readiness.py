"""Readiness is awaited: each input (a `Flag`, the router's wait) wakes the waiter; no polling."""

from __future__ import annotations

import trio
import trio.testing

from agent.flag import Flag
from agent.runtime.run import Readiness
from tests.fakes import MemoryNetwork, MemoryRouter


async def test_flag_wakes_waiters_only_when_set_true() -> None:
    flag = Flag()
    woke: list[bool] = []

    async def waiter() -> None:
        await flag.wait()
        woke.append(bool(flag))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        flag.set(False)
        await trio.testing.wait_all_tasks_blocked()
        assert woke == []
        flag.set(True)
    assert woke == [True]
    await flag.wait()  # already true: returns at once


async def test_readiness_wait_returns_when_the_last_input_arrives(
    autojump_clock: trio.testing.MockClock,
) -> None:
    router = MemoryRouter(MemoryNetwork(), ready=False)
    router_ready = Flag()
    readiness = Readiness(router, router_ready.wait)
    done = trio.Event()

    async def announce() -> None:
        await readiness.wait()
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(announce)
        for step in ("advertised", "connected", "router"):
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set() and not readiness()
            if step == "advertised":
                readiness.advertised.set()
            elif step == "connected":
                readiness.connected.set()
            else:
                router.set_ready(True)
                router_ready.set()
        with trio.fail_after(1):
            await done.wait()
    assert readiness() and readiness.detail() == {
        "containerd": True,
        "advertised": True,
        "router": True,
        "running": True,
    }


async def test_a_lost_input_is_waited_for_again(autojump_clock: trio.testing.MockClock) -> None:
    router = MemoryRouter(MemoryNetwork(), ready=True)
    readiness = Readiness(router, Flag(True).wait, connected=Flag(False), advertised=Flag(True))
    done = trio.Event()

    async def announce() -> None:
        await readiness.wait()
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(announce)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        readiness.connected.set(True)
    assert done.is_set()
