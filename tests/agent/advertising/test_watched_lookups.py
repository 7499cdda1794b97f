"""Both supplies over the agent's Router on real DHT nodes (loopback UDP): lookups are watched.

The DHT pushes each reply into the waiting request (`RegistryRouter.watch`): no lookup task, the
`_recent` memory still filled, and when the request ends, however it ends, no watch is left in
the node's table.  Claims go through the agent's real `KeyAdvertiser`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from agent.advertising.advertiser import KeyAdvertiser
from agent.advertising.peer_router import RegistryRouter
from dht.node import Node, NodeConfig
from registry.burst.attempts import GiveUp, MirrorAttempts
from registry.burst.claim import ClaimSettings
from registry.burst.claim_supply import ClaimingSupply, ClaimParticipation
from registry.burst.supply import PeerSupply, RouterFailure, WatchesProviders
from registry.interfaces import Peer, PeerState

KEY = "sha256:" + "5a" * 32
SETTINGS = ClaimSettings(resolve_timeout=0.2, settle=0.05, ingest_wait=0.3, poll=0.05)


def node(seed: int) -> Node:
    config = NodeConfig(
        node_id=bytes([seed]) * 32, bind_host="127.0.0.1", bind_port=0, registry_port=7000 + seed
    )
    return Node(config)


@asynccontextmanager
async def two_nodes(*, a_silent: bool = False) -> AsyncIterator[tuple[Node, Node]]:
    """a and b know each other; `a_silent`: a stops after that, so b's lookups wait for it
    (until the DHT's RPC timeout) and stay in b's table meanwhile."""
    a, b = node(1), node(2)
    async with trio.open_nursery() as nursery:
        a_scope = trio.CancelScope()

        async def serve_a(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with a_scope:
                await a.serve(task_status=task_status)

        await nursery.start(serve_a)
        await nursery.start(b.serve)
        assert a.bound is not None
        await b.bootstrap([a.bound])
        with trio.fail_after(5):
            await a.router.wait_ready()
        if a_silent:
            a_scope.cancel()
        yield a, b
        nursery.cancel_scope.cancel()


def claiming(
    router: RegistryRouter, me: Node, nursery: trio.Nursery
) -> tuple[ClaimingSupply, KeyAdvertiser]:
    board = KeyAdvertiser(router)
    claims = ClaimParticipation(board, me.config.node_id)
    supply = ClaimingSupply(router, claims, SETTINGS, KEY, frozenset(), nursery, "127.0.0.1")
    return supply, board


def test_the_agents_router_pushes() -> None:
    assert issubclass(RegistryRouter, WatchesProviders)


async def test_plain_supply_gets_the_provider_pushed_and_remembered() -> None:
    async with two_nodes() as (a, b):
        await a.router.advertise([KEY])
        router = RegistryRouter(b.router)
        attempts = MirrorAttempts(KEY, max_attempts=3)
        async with trio.open_nursery() as nursery:
            supply = PeerSupply(router, KEY, resolve_timeout=1.0)
            supply.start(nursery)
            assert len(b._streams) == 1  # the lookup went out as start() returned
            peer = await supply.next_peer(attempts)
            assert isinstance(peer, Peer) and peer.node_id == a.config.node_id
            assert await supply.next() is None  # converged: the channel closed by `done`
            assert b._streams == {}
            nursery.cancel_scope.cancel()
        assert [p.node_id for p in router.known_providers(KEY)] == [a.config.node_id]


async def test_a_plain_request_cancelled_mid_lookup_leaves_no_watch() -> None:
    async with two_nodes(a_silent=True) as (_, b):
        router = RegistryRouter(b.router)
        async with trio.open_nursery() as nursery:
            PeerSupply(router, KEY).start(nursery)
            assert len(b._streams) == 1
            nursery.cancel_scope.cancel()  # the request ends before any reply (no finish())
        assert b._streams == {}


async def test_a_claimed_miss_and_a_found_provider_over_real_nodes() -> None:
    async with two_nodes() as (a, b):
        # nobody holds KEY: b's request claims, settles, looks again, and is the claimant
        router = RegistryRouter(b.router)
        async with trio.open_nursery() as nursery:
            supply, board = claiming(router, b, nursery)
            with trio.fail_after(5):
                result = await supply.next_peer(MirrorAttempts(KEY, max_attempts=3))
            assert isinstance(result, GiveUp) and supply.claimant
            assert board.state(KEY) is PeerState.CLAIM  # published through the advertiser
            assert b._streams == {}  # decided: its lookup was dropped
            await supply.finish()  # held for ingest_wait, then withdrawn (no nursery given)
            assert board.state(KEY) is None
            nursery.cancel_scope.cancel()
        # now a holds it: a's record is pushed into b's next request, which fetches from a
        await a.router.advertise([KEY])
        async with trio.open_nursery() as nursery:
            supply, _ = claiming(router, b, nursery)
            with trio.fail_after(5):
                peer = await supply.next_peer(MirrorAttempts(KEY, max_attempts=3))
            assert isinstance(peer, Peer) and peer.node_id == a.config.node_id
            await supply.finish()
            nursery.cancel_scope.cancel()
        assert b._streams == {}


async def test_a_claiming_request_cancelled_while_it_waits_leaves_no_watch() -> None:
    async with two_nodes(a_silent=True) as (_, b):
        router = RegistryRouter(b.router)
        async with trio.open_nursery() as nursery:
            supply, _ = claiming(router, b, nursery)
            nursery.start_soon(supply.next_peer, MirrorAttempts(KEY, max_attempts=3))
            with trio.fail_after(5):
                while not b._streams:  # its first lookup is out
                    await trio.lowlevel.checkpoint()
            nursery.cancel_scope.cancel()  # the client left: no finish(), no decision
        assert b._streams == {}


class FailingWatch:
    """A pushing Router whose lookups cannot start."""

    def ready(self) -> bool:
        return True

    def watch(self, key: str, found: Callable[[Peer], None], done: Callable[[], None]) -> object:
        raise OSError("the lookup could not start")


@pytest.mark.parametrize("kind", ["plain", "claiming"])
async def test_a_watch_that_fails_to_start_is_a_router_failure(kind: str) -> None:
    router = FailingWatch()
    attempts = MirrorAttempts(KEY, max_attempts=3)
    async with trio.open_nursery() as nursery:
        supply: PeerSupply | ClaimingSupply
        if kind == "plain":
            supply = PeerSupply(router, KEY)  # type: ignore[arg-type]
        else:
            board = KeyAdvertiser(router)  # type: ignore[arg-type]
            claims = ClaimParticipation(board, b"\x01" * 32)
            supply = ClaimingSupply(
                router,  # type: ignore[arg-type]
                claims,
                SETTINGS,
                KEY,
                frozenset(),
                nursery,
                "127.0.0.1",
            )
        supply.start(nursery)
        with trio.fail_after(5), pytest.raises(RouterFailure, match="could not start"):
            await supply.next_peer(attempts)
        nursery.cancel_scope.cancel()
