"""The advertiser's group commit: queued changes reach the Router in few calls, in order, and a
caller cancelled while it waits still has its change published; uncontended, a publish adds no
yield to the Router's own."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager

import trio
import trio.testing

from agent.advertising.advertiser import KeyAdvertiser
from registry.interfaces import Peer, PeerState


def digest(i: int) -> str:
    return f"sha256:{i:064x}"


class SlowRouter:
    """Records each call; a call waits while `gate` is closed (a Router under load)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[str, ...], PeerState | None]] = []
        self.gate: trio.Event | None = None

    def ready(self) -> bool:
        return True

    async def _call(self, kind: str, keys: Iterable[str], state: PeerState | None) -> None:
        self.calls.append((kind, tuple(keys), state))
        if self.gate is not None:
            await self.gate.wait()
        await trio.lowlevel.checkpoint()

    async def advertise(self, keys: Iterable[str], state: PeerState = PeerState.COMPLETE) -> None:
        await self._call("advertise", keys, state)

    async def withdraw(self, keys: Iterable[str]) -> None:
        await self._call("withdraw", keys, None)

    def resolve(self, key: str) -> AbstractAsyncContextManager[AsyncIterator[Peer]]:
        raise NotImplementedError

    def last_state(self, key: str) -> PeerState | None:
        state: PeerState | None = None
        for _, keys, s in self.calls:
            if key in keys:
                state = s
        return state


async def test_queued_claims_reach_the_router_in_one_call() -> None:
    router = SlowRouter()
    advertiser = KeyAdvertiser(router)
    router.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(advertiser.claim, digest(0))  # holds the lock, its call waits
        await trio.testing.wait_all_tasks_blocked()
        for i in range(1, 31):
            nursery.start_soon(advertiser.claim, digest(i))
        await trio.testing.wait_all_tasks_blocked()
        router.gate.set()
    # the first call, then every queued claim in one (not one call, one pass, per caller)
    assert len(router.calls) == 2
    assert set(router.calls[1][1]) == {digest(i) for i in range(1, 31)}
    assert all(router.last_state(digest(i)) is PeerState.CLAIM for i in range(31))


async def test_a_caller_cancelled_while_waiting_still_has_its_claim_published(
    autojump_clock: trio.testing.MockClock,
) -> None:
    router = SlowRouter()
    advertiser = KeyAdvertiser(router)
    router.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(advertiser.claim, digest(1))
        await trio.testing.wait_all_tasks_blocked()

        async def bounded_claim() -> None:
            with trio.move_on_after(0.01):  # the claim driver's publish bound
                await advertiser.claim(digest(2))

        nursery.start_soon(bounded_claim)
        await trio.sleep(0.05)  # the bound passes while the lock is held
        router.gate.set()
    assert router.last_state(digest(2)) is None  # not yet: nobody has drained the queue
    await advertiser.claim(digest(3))
    assert router.last_state(digest(2)) is PeerState.CLAIM
    assert router.last_state(digest(3)) is PeerState.CLAIM


async def test_a_key_queued_twice_reaches_the_router_at_its_latest_state() -> None:
    router = SlowRouter()
    advertiser = KeyAdvertiser(router)
    router.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(advertiser.claim, digest(1))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(advertiser.claim, digest(2))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(advertiser.unclaim, digest(2))
        await trio.testing.wait_all_tasks_blocked()
        router.gate.set()
    assert router.last_state(digest(1)) is PeerState.CLAIM
    assert router.last_state(digest(2)) is None
    assert ("advertise", (digest(2),), PeerState.CLAIM) not in router.calls


class InstantRouter(SlowRouter):
    """Records each call and never yields (so any yield of a publish is the advertiser's)."""

    async def _call(self, kind: str, keys: Iterable[str], state: PeerState | None) -> None:
        self.calls.append((kind, tuple(keys), state))


async def test_an_uncontended_claim_and_unclaim_add_no_yield_to_the_routers() -> None:
    router = InstantRouter()
    advertiser = KeyAdvertiser(router)
    with trio.testing.assert_no_checkpoints():
        await advertiser.claim(digest(1))
        await advertiser.unclaim(digest(1))
    assert router.calls == [
        ("advertise", (digest(1),), PeerState.CLAIM),
        ("withdraw", (digest(1),), None),
    ]


async def test_a_publisher_that_raises_lets_the_next_caller_publish() -> None:
    class BrokenOnce(InstantRouter):
        async def _call(self, kind: str, keys: Iterable[str], state: PeerState | None) -> None:
            await super()._call(kind, keys, state)
            if len(self.calls) == 1:
                raise OSError("the router failed")

    router = BrokenOnce()
    advertiser = KeyAdvertiser(router)
    try:
        await advertiser.claim(digest(1))
    except OSError:
        pass
    await advertiser.claim(digest(2))  # not stuck behind the failed publisher
    assert router.calls[-1] == ("advertise", (digest(2),), PeerState.CLAIM)
