"""The agent's adapter gives the registry `Peer`s for what the DHT resolves (real UDP, loopback)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

import trio
import trio.testing

from agent.advertising.peer_router import RECENT_KEYS, RECENT_TTL, RegistryRouter
from dht.ids import ProviderInfo, RecordState
from dht.node import DhtRouter, Node, NodeConfig
from registry.interfaces import Peer, PeerState, Router

KEY = "sha256:" + "ef" * 32


PSK = b"the cluster key of these tests!"


def node(seed: int, more_hosts: tuple[str, ...] = (), psk: bytes | None = None) -> Node:
    return Node(
        NodeConfig(
            node_id=bytes([seed]) * 32,
            bind_host="127.0.0.1",
            bind_port=0,
            registry_port=6000 + seed,
            more_hosts=more_hosts,
            psk=psk,
        )
    )


@asynccontextmanager
async def provider_and_seeker(
    seed_a: int, seed_b: int, more_hosts: tuple[str, ...] = (), psk: bytes | None = None
) -> AsyncIterator[tuple[RegistryRouter, RegistryRouter]]:
    """Two DHT nodes on loopback (b bootstrapped from a), each behind the registry adapter."""
    a, b = node(seed_a, more_hosts, psk), node(seed_b, psk=psk)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.serve)
        await nursery.start(b.serve)
        assert a.bound is not None
        await b.bootstrap([a.bound])
        yield RegistryRouter(a.router), RegistryRouter(b.router)
        nursery.cancel_scope.cancel()


async def resolve_until_found(seeker: Router) -> list[Peer]:
    with trio.fail_after(5):
        while True:
            async with seeker.resolve(KEY) as peers:
                found = [p async for p in peers]
            if found:
                return found
            await trio.sleep(0.01)


async def test_registry_router_yields_peers_for_dht_providers() -> None:
    async with provider_and_seeker(1, 2) as (provider, seeker):
        assert provider.ready() and seeker.ready()
        await provider.advertise([KEY])
        found = await resolve_until_found(seeker)
        assert found == [Peer(bytes([1]) * 32, "127.0.0.1", 6001)]
        assert all(type(p) is Peer for p in found)
        await provider.withdraw([KEY])
        async with provider.resolve(KEY) as peers:
            assert [p async for p in peers] == []  # never yourself


async def test_a_provider_with_several_addresses_is_one_peer_with_all_of_them() -> None:
    """The provider names another address (version-3 ADD_PROVIDER, over real UDP): the seeker
    gets one peer carrying both, its DHT source address first.  Other addresses are taken only
    from an authenticated sender: the two share the cluster key."""
    pair = provider_and_seeker(7, 8, more_hosts=("127.0.0.2",), psk=PSK)
    async with pair as (provider, seeker):
        await provider.advertise([KEY])
        found = await resolve_until_found(seeker)
        assert found == [
            Peer(bytes([7]) * 32, "127.0.0.1", 6007, more_hosts=("127.0.0.2",)),
        ]
        assert found[0].hosts == ("127.0.0.1", "127.0.0.2")
        assert seeker.known_providers(KEY) == found


async def test_record_states_travel_over_real_udp_and_withdraw_reaches_the_seeker() -> None:
    async with provider_and_seeker(3, 4) as (provider, seeker):

        async def states() -> list[PeerState]:
            async with seeker.resolve(KEY) as peers:
                return [p.state async for p in peers]

        async def until(expected: list[PeerState]) -> None:
            with trio.fail_after(5):
                while True:
                    if await states() == expected:
                        return
                    await trio.sleep(0.01)

        await provider.advertise([KEY], PeerState.INFLIGHT)
        await until([PeerState.INFLIGHT])
        await provider.advertise([KEY], PeerState.COMPLETE)  # committed
        await until([PeerState.COMPLETE])
        await provider.advertise([KEY], PeerState.CLAIM)
        await until([PeerState.CLAIM])
        await provider.withdraw([KEY])  # a claim record is dropped by its holder at once
        await until([])


async def test_known_providers_answer_without_a_lookup() -> None:
    async with provider_and_seeker(5, 6) as (provider, seeker):
        assert seeker.known_providers(KEY) == []
        await provider.advertise([KEY])
        found = await resolve_until_found(seeker)
        assert seeker.known_providers(KEY) == found
        assert provider.known_providers(KEY) == []  # never yourself


class _OneProviderDht:
    """A DhtRouter stand-in: holds no records itself; every lookup finds one provider."""

    def __init__(self, provider: ProviderInfo) -> None:
        self.provider = provider

    def known_providers(self, key: str) -> list[ProviderInfo]:
        return []

    @asynccontextmanager
    async def resolve(self, key: str) -> AsyncIterator[AsyncIterator[ProviderInfo]]:
        async def stream() -> AsyncIterator[ProviderInfo]:
            yield self.provider

        yield stream()


async def test_lookup_results_are_known_for_a_while(autojump_clock: trio.testing.MockClock) -> None:
    info = ProviderInfo(bytes([9]) * 32, "10.0.0.9", 5000, RecordState.COMPLETE)
    router = RegistryRouter(cast(DhtRouter, _OneProviderDht(info)))
    assert router.known_providers(KEY) == []
    async with router.resolve(KEY) as peers:
        found = [p async for p in peers]
    assert router.known_providers(KEY) == found == [Peer(info.node_id, "10.0.0.9", 5000)]
    assert router.known_providers("sha256:" + "00" * 32) == []
    await trio.sleep(RECENT_TTL + 1)
    assert router.known_providers(KEY) == []


async def test_lookup_results_are_bounded_least_recently_used_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    info = ProviderInfo(bytes([9]) * 32, "10.0.0.9", 5000, RecordState.COMPLETE)
    router = RegistryRouter(cast(DhtRouter, _OneProviderDht(info)))
    keys = [f"sha256:{i:064x}" for i in range(RECENT_KEYS + 1)]
    for key in keys:
        async with router.resolve(key) as peers:
            assert [p async for p in peers]
    # one key over the bound: the first one found is forgotten, the rest are known
    assert router.known_providers(keys[0]) == []
    assert router.known_providers(keys[1]) and router.known_providers(keys[-1])


async def test_lookups_reach_every_node_while_the_table_holds_fewer_than_k() -> None:
    """Two real nodes on loopback: each knows one contact, fewer than k (20), so every lookup
    asks every node (the claim protocol's short settle window relies on it); with k = 1 the one
    contact fills the table and a lookup may stop short of someone."""
    a, b = node(5), node(6)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.serve)
        await nursery.start(b.serve)
        assert a.bound is not None
        await b.bootstrap([a.bound])
        with trio.fail_after(5):
            await a.router.wait_ready()  # a learns b from its datagrams
        assert RegistryRouter(a.router).lookups_reach_all()
        assert RegistryRouter(b.router).lookups_reach_all()
        nursery.cancel_scope.cancel()
    small = Node(NodeConfig(node_id=bytes([9]) * 32, bind_host="127.0.0.1", bind_port=0, k=1))
    other = node(10)
    async with trio.open_nursery() as nursery:
        await nursery.start(small.serve)
        await nursery.start(other.serve)
        assert other.bound is not None
        await small.bootstrap([other.bound])
        assert small.router.ready()
        assert not RegistryRouter(small.router).lookups_reach_all()
        nursery.cancel_scope.cancel()
