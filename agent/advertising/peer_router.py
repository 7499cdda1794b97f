"""The registry's `Router` over the DHT: the one place where dht's records become registry `Peer`s.

Why here: `dht/` and `registry/` do not import each other (each defines the records it needs);
the agent, which wires both, adapts the DHT node's advertise/resolve face to the registry's Router.

`known_providers` answers without waiting: the DHT's own provider records plus the providers
lookups found in the last RECENT_TTL seconds.  The mirror starts with those, so a loaded event loop
(a lookup task that is not scheduled within the 20 ms resolve deadline) does not turn content a
peer holds into a false miss; the live lookup still runs beside it.

`watch` is the push face of a lookup (`registry.burst.supply.WatchesProviders`): the DHT calls
the request's callbacks from its receive loop, so a reply wakes the request task itself, with no
lookup task in between.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager

import trio
from cachetools import TTLCache

from dht.ids import ProviderInfo, RecordState
from dht.node import DhtRouter, LookupWatch
from registry.interfaces import Peer, PeerState, Router

RECENT_TTL = 10.0  # seconds a lookup's providers are handed out again without a lookup
RECENT_KEYS = 4096  # keys remembered at most (the least recently used forgotten first)


def as_peer(provider: ProviderInfo) -> Peer:
    """The registry's view of a provider record: one peer, every address it named (the DHT
    groups a node's addresses into one record, `dht.addresses`); its connects race them."""
    return Peer(
        node_id=provider.node_id,
        host=provider.host,
        port=provider.port,
        state=PeerState[provider.state.name],
        more_hosts=provider.more_hosts,
    )


class RegistryRouter:
    """`registry.interfaces.Router` backed by a `dht.node.DhtRouter`."""

    def __init__(self, dht: DhtRouter) -> None:
        self._dht = dht
        # key -> providers found by lookups; a key's entry lives RECENT_TTL s from its last find
        # (on the Trio clock: the router is only used inside the agent's trio.run)
        self._recent: TTLCache[str, dict[tuple[str, int], Peer]] = TTLCache(
            maxsize=RECENT_KEYS, ttl=RECENT_TTL, timer=trio.current_time
        )

    def ready(self) -> bool:
        return self._dht.ready()

    async def advertise(self, keys: Iterable[str], state: PeerState = PeerState.COMPLETE) -> None:
        await self._dht.advertise(keys, RecordState[state.name])

    async def withdraw(self, keys: Iterable[str]) -> None:
        await self._dht.withdraw(keys)

    def lookups_reach_all(self) -> bool:
        """Every lookup asks every node (the claim protocol's settle window depends on it)."""
        return self._dht.lookups_reach_all()

    def known_providers(self, key: str) -> list[Peer]:
        """Providers of `key` known without a lookup (see the module doc)."""
        peers = {(p.host, p.port): p for p in map(as_peer, self._dht.known_providers(key))}
        for address, peer in self._recent.get(key, {}).items():
            peers.setdefault(address, peer)
        return list(peers.values())

    def _remember(self, key: str, peer: Peer) -> None:
        peers = self._recent.get(key, {})
        peers[(peer.host, peer.port)] = peer
        self._recent[key] = peers  # (re)set: lives RECENT_TTL s from now

    @asynccontextmanager
    async def resolve(self, key: str) -> AsyncIterator[AsyncIterator[Peer]]:
        async with self._dht.resolve(key) as providers:
            yield _Peers(providers, lambda peer: self._remember(key, peer))


    def watch(
        self, key: str, found: Callable[[Peer], None], done: Callable[[], None]
    ) -> LookupWatch:
        """Look `key` up, calling `found` per provider and `done` at the end, synchronously
        from the DHT's loops (see `dht.node.DhtRouter.watch`); `cancel()` the result when the
        request is over.  Found providers are remembered as `resolve`'s are."""

        def provider(info: ProviderInfo) -> None:
            peer = as_peer(info)
            self._remember(key, peer)
            found(peer)

        return self._dht.watch(key, provider, done)


def registry_router(dht: DhtRouter) -> Router:
    """The registry's Router over `dht` (typed as the Protocol, so mypy checks the match)."""
    return RegistryRouter(dht)


class _Peers:
    """Maps a provider stream to peers (a plain iterator: nothing to finalise when left early)."""

    def __init__(
        self, providers: AsyncIterator[ProviderInfo], found: Callable[[Peer], None]
    ) -> None:
        self._providers = providers
        self._found = found

    def __aiter__(self) -> _Peers:
        return self

    async def __anext__(self) -> Peer:
        peer = as_peer(await self._providers.__anext__())
        self._found(peer)
        return peer
