"""Provider supply: providers the Router already knows are handed out before the lookup runs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import trio

from registry.burst.attempts import GiveUp, MirrorAttempts
from registry.burst.claim import ClaimSettings
from registry.burst.claim_supply import ClaimingSupply, ClaimParticipation
from registry.burst.supply import PeerSupply, next_usable_peer
from registry.interfaces import Peer, PeerState

KEY = "sha256:" + "ab" * 32
KNOWN = Peer(b"\x01" * 32, "10.0.0.1", 5000)


class StuckLookupRouter:
    """A Router whose lookups never deliver (a lookup task starved of the event loop)."""

    def ready(self) -> bool:
        return True

    async def advertise(self, keys: Iterable[str], state: PeerState = PeerState.COMPLETE) -> None:
        pass

    async def withdraw(self, keys: Iterable[str]) -> None:
        pass

    @asynccontextmanager
    async def resolve(self, key: str) -> AsyncIterator[AsyncIterator[Peer]]:
        async def never() -> AsyncIterator[Peer]:
            await trio.sleep_forever()
            yield KNOWN  # pragma: no cover

        yield never()


class KnowingRouter(StuckLookupRouter):
    """... that knows KNOWN without a lookup."""

    def known_providers(self, key: str) -> list[Peer]:
        return [KNOWN] if key == KEY else []


async def supply_result(router: StuckLookupRouter) -> Peer | GiveUp:
    attempts = MirrorAttempts(KEY, max_attempts=3)
    async with trio.open_nursery() as nursery:
        supply = PeerSupply(router, KEY)  # type: ignore[arg-type]
        nursery.start_soon(supply.feed)
        result = await next_usable_peer(supply, attempts, resolve_timeout=0.001)
        nursery.cancel_scope.cancel()
    return result


async def test_known_providers_come_before_the_lookup() -> None:
    assert await supply_result(KnowingRouter()) == KNOWN


async def test_without_them_a_stuck_lookup_is_a_miss() -> None:
    assert isinstance(await supply_result(StuckLookupRouter()), GiveUp)


class NoClaims:
    async def claim(self, digest: str) -> None:
        pass

    async def unclaim(self, digest: str) -> None:
        pass


async def claiming_result(router: StuckLookupRouter) -> Peer | GiveUp:
    attempts = MirrorAttempts(KEY, max_attempts=3)
    settings = ClaimSettings(resolve_timeout=0.001, settle=0.001, ingest_wait=0.01, poll=0.001)
    async with trio.open_nursery() as nursery:
        supply = ClaimingSupply(
            router,  # type: ignore[arg-type]
            ClaimParticipation(NoClaims(), b"\x02" * 32),
            settings,
            KEY,
            frozenset(),
            nursery,
            "127.0.0.1",
        )
        result = await supply.next_peer(attempts)
        await supply.finish()
        nursery.cancel_scope.cancel()
    return result


async def test_the_claims_path_also_starts_with_known_providers() -> None:
    assert await claiming_result(KnowingRouter()) == KNOWN
    assert isinstance(await claiming_result(StuckLookupRouter()), GiveUp)
