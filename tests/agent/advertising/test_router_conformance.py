"""The DHT-backed `Router` passes the conformance checks the in-memory fake passes.

Real `dht` nodes on loopback UDP (keyless and with a cluster key), each behind the agent's
registry adapter (`RegistryRouter`): the provider advertises, the seeker finds it over the wire.
"""

from __future__ import annotations

import pytest
import trio

from agent.advertising.peer_router import RegistryRouter
from dht.node import Node, NodeConfig
from registry.interfaces import Peer
from tests.registry.conformance import check_router


def node(seed: int, psk: bytes | None) -> Node:
    config = NodeConfig(
        node_id=bytes([seed]) * 32,
        bind_host="127.0.0.1",
        bind_port=0,
        registry_port=6000 + seed,
        psk=psk,
    )
    return Node(config)


@pytest.mark.parametrize("psk", [None, b"the cluster key of this test"], ids=["keyless", "keyed"])
async def test_the_dht_router_passes_the_conformance_checks(psk: bytes | None) -> None:
    provider, seeker = node(1, psk), node(2, psk)
    async with trio.open_nursery() as nursery:
        await nursery.start(provider.serve)
        await nursery.start(seeker.serve)
        assert provider.bound is not None
        await seeker.bootstrap([provider.bound])
        await check_router(
            RegistryRouter(provider.router),
            RegistryRouter(seeker.router),
            Peer(bytes([1]) * 32, "127.0.0.1", 6001),
        )
        nursery.cancel_scope.cancel()
