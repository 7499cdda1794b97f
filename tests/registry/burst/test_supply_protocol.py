"""The `Supply` protocol, through its two implementations: the plain lookup (`PeerSupply`) and a
burst's claim/wait (`ClaimingSupply`).  The mirror run uses nothing else of either.  Each test runs
over a Router that is iterated (`resolve`) and over one that pushes (`WatchesProviders.watch`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from registry.burst.attempts import GiveUp, MirrorAttempts, peer_key
from registry.burst.claim import ClaimSettings
from registry.burst.claim_supply import ClaimingSupply, ClaimParticipation
from registry.burst.supply import NoExtraPeer, PeerSupply, Supply
from registry.interfaces import Peer, PeerState

KEY = "sha256:" + "cd" * 32
A = Peer(b"\x0a" * 32, "10.0.0.10", 5000)
B = Peer(b"\x0b" * 32, "10.0.0.11", 5000)


class ListRouter:
    """A Router whose lookups deliver `peers` and then converge."""

    def __init__(self, peers: list[Peer]) -> None:
        self.peers = peers
        self.lookups = 0

    def ready(self) -> bool:
        return True

    async def advertise(self, keys: Iterable[str], state: PeerState = PeerState.COMPLETE) -> None:
        pass

    async def withdraw(self, keys: Iterable[str]) -> None:
        pass

    @asynccontextmanager
    async def resolve(self, key: str) -> AsyncIterator[AsyncIterator[Peer]]:
        self.lookups += 1

        async def deliver() -> AsyncIterator[Peer]:
            for peer in self.peers:
                await trio.lowlevel.checkpoint()
                yield peer

        yield deliver()


class Watch:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class WatchingRouter(ListRouter):
    """`ListRouter` that also pushes: each peer, then the end, from another task (as the DHT's
    receive loop does), none after `cancel`."""

    def __init__(self, peers: list[Peer]) -> None:
        super().__init__(peers)
        self.watches: list[Watch] = []

    def watch(self, key: str, found: Callable[[Peer], None], done: Callable[[], None]) -> Watch:
        self.lookups += 1
        handle = Watch()
        self.watches.append(handle)

        async def deliver() -> None:
            for peer in self.peers:
                await trio.lowlevel.checkpoint()
                if handle.cancelled:
                    return
                found(peer)
            await trio.lowlevel.checkpoint()
            if not handle.cancelled:
                done()

        trio.lowlevel.spawn_system_task(deliver)
        return handle


@pytest.fixture(autouse=True, params=["pulled", "pushed"])
def router_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here over both kinds of Router (`make_router` is what `with_supply` uses)."""
    kind: str = request.param
    monkeypatch.setitem(ROUTERS, "current", WatchingRouter if kind == "pushed" else ListRouter)
    return kind


ROUTERS: dict[str, type[ListRouter]] = {"current": ListRouter}


class NoClaims:
    async def claim(self, digest: str) -> None:
        pass

    async def unclaim(self, digest: str) -> None:
        pass


def plain(router: ListRouter, nursery: trio.Nursery, avoid: frozenset[tuple[str, int]]) -> Supply:
    return PeerSupply(router, KEY, resolve_timeout=0.005)  # type: ignore[arg-type]


def claiming(
    router: ListRouter, nursery: trio.Nursery, avoid: frozenset[tuple[str, int]]
) -> Supply:
    settings = ClaimSettings(resolve_timeout=0.005, settle=0.002, ingest_wait=0.01, poll=0.002)
    return ClaimingSupply(
        router,  # type: ignore[arg-type]
        ClaimParticipation(NoClaims(), b"\x02" * 32),
        settings,
        KEY,
        avoid,
        nursery,
        "127.0.0.1",
    )


Factory = Callable[[ListRouter, trio.Nursery, frozenset[tuple[str, int]]], Supply]
BOTH = pytest.mark.parametrize("make", [plain, claiming], ids=["plain", "claiming"])


async def with_supply(
    make: Factory,
    peers: list[Peer],
    use: Callable[[Supply, MirrorAttempts], Awaitable[None]],
    avoid: frozenset[tuple[str, int]] = frozenset(),
) -> None:
    attempts = MirrorAttempts(KEY, max_attempts=3, avoid=avoid)
    router = ROUTERS["current"](peers)
    async with trio.open_nursery() as nursery:
        supply = make(router, nursery, avoid)
        supply.start(nursery)
        try:
            await use(supply, attempts)
        finally:
            await supply.finish()
        nursery.cancel_scope.cancel()
    if isinstance(router, WatchingRouter):  # the request is over: no watch left running
        assert router.watches and all(w.cancelled for w in router.watches)


@BOTH
async def test_next_peer_hands_out_a_provider_the_lookup_found(
    make: Factory, autojump_clock: trio.testing.MockClock
) -> None:
    async def use(supply: Supply, attempts: MirrorAttempts) -> None:
        assert await supply.next_peer(attempts) == A

    await with_supply(make, [A], use)


@BOTH
async def test_an_avoided_provider_is_never_handed_out(
    make: Factory, autojump_clock: trio.testing.MockClock
) -> None:
    async def use(supply: Supply, attempts: MirrorAttempts) -> None:
        assert await supply.next_peer(attempts) == B

    await with_supply(make, [A, B], use, avoid=frozenset({peer_key(A)}))


@BOTH
async def test_no_provider_is_a_give_up(
    make: Factory, autojump_clock: trio.testing.MockClock
) -> None:
    async def use(supply: Supply, attempts: MirrorAttempts) -> None:
        assert isinstance(await supply.next_peer(attempts), GiveUp)

    await with_supply(make, [], use)


async def test_plain_supply_helpers_and_hedges(autojump_clock: trio.testing.MockClock) -> None:
    """Several providers may serve at once; an extra provider is the next usable one, and NEVER
    once the lookup converged; a provider already here is handed out without a wait."""

    async def use(supply: Supply, attempts: MirrorAttempts) -> None:
        assert supply.multi_peer
        assert await supply.next_peer(attempts) == A
        await trio.testing.wait_all_tasks_blocked()
        assert supply.ready_peer(attempts) == B  # already delivered: no wait
        supply.put_back(B)
        assert await supply.extra_peer(attempts) == B  # put back: handed out again
        assert await supply.extra_peer(attempts) is NoExtraPeer.NEVER

    await with_supply(plain, [A, B], use)


async def test_plain_supply_asks_a_busy_provider_again_after_a_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def use(supply: Supply, attempts: MirrorAttempts) -> None:
        assert await supply.next_peer(attempts) == A
        attempts.tried.discard(peer_key(A))  # a busy answer uses up no attempt
        supply.busy(A, retry_after=1.0)
        before = trio.current_time()
        assert await supply.next_peer(attempts) == A
        assert trio.current_time() - before >= 0.1  # BUSY_FIRST_RETRY, not at once

    await with_supply(plain, [A], use)


async def test_claiming_supply_one_provider_at_a_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A claim decides who serves: no helpers, no ready providers; a hedge is a complete
    provider already seen (LATER when there is none), and a failed one is not handed out again."""

    async def use(supply: Supply, attempts: MirrorAttempts) -> None:
        assert not supply.multi_peer
        first = await supply.next_peer(attempts)
        assert isinstance(first, Peer)
        attempts.start_fetch(first)
        await trio.testing.wait_all_tasks_blocked()  # the lookup has delivered both
        assert supply.ready_peer(attempts) is None
        other = B if first == A else A
        assert await supply.extra_peer(attempts) == other
        attempts.start_fetch(other)
        assert await supply.extra_peer(attempts) is NoExtraPeer.LATER
        supply.failed(first)
        attempts.fetch_failed()
        supply.failed(other)
        attempts.fetch_failed()
        assert isinstance(await supply.next_peer(attempts), GiveUp)

    await with_supply(claiming, [A, B], use)


async def test_a_provider_already_known_is_handed_out_without_a_yield() -> None:
    """Under load every yield is a pass over every task: a provider the Router already knows
    needs none (the request's next step is its own I/O)."""

    class Knowing(ListRouter):
        def known_providers(self, key: str) -> list[Peer]:
            return [A]

    supply = PeerSupply(Knowing([]), KEY)  # type: ignore[arg-type]
    with trio.testing.assert_no_checkpoints():
        assert await supply.next_peer(MirrorAttempts(KEY, max_attempts=3)) == A
