"""The registry's `Router` over the DHT: the one place where dht's records become registry `Peer`s.

Why here: `dht/` and `registry/` do not import each other (each defines the records it needs);
the agent, which wires both, adapts the DHT node's advertise/resolve face to the registry's Router.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

from dht.ids import ProviderInfo, RecordState
from dht.node import DhtRouter
from registry.interfaces import Peer, PeerState, Router


def as_peer(provider: ProviderInfo) -> Peer:
    state = PeerState[provider.state.name]
    return Peer(node_id=provider.node_id, host=provider.host, port=provider.port, state=state)


class RegistryRouter:
    """`registry.interfaces.Router` backed by a `dht.node.DhtRouter`."""

    def __init__(self, dht: DhtRouter) -> None:
        self._dht = dht

    def ready(self) -> bool:
        return self._dht.ready()

    async def advertise(self, keys: Iterable[str], state: PeerState = PeerState.COMPLETE) -> None:
        await self._dht.advertise(keys, RecordState[state.name])

    async def withdraw(self, keys: Iterable[str]) -> None:
        await self._dht.withdraw(keys)

    @asynccontextmanager
    async def resolve(self, key: str) -> AsyncIterator[AsyncIterator[Peer]]:
        async with self._dht.resolve(key) as providers:
            yield _Peers(providers)


def registry_router(dht: DhtRouter) -> Router:
    """The registry's Router over `dht` (typed as the Protocol, so mypy checks the match)."""
    return RegistryRouter(dht)


class _Peers:
    """Maps a provider stream to peers (a plain iterator: nothing to finalise when left early)."""

    def __init__(self, providers: AsyncIterator[ProviderInfo]) -> None:
        self._providers = providers

    def __aiter__(self) -> _Peers:
        return self

    async def __anext__(self) -> Peer:
        return as_peer(await self._providers.__anext__())
