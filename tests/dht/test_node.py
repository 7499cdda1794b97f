"""The Trio driver on real loopback UDP: join, advertise, resolve, miss, cancel, bad input, PSK,
floods, and refresh/expiry under a mock clock."""

from __future__ import annotations

import random
import socket
import time

import pytest
import trio
import trio.testing

from dht import codec
from dht.codec import Ping
from dht.ids import Contact, ProviderInfo, key_id
from dht.node import DhtRouter, Node, NodeConfig

KEY = "sha256:" + "cd" * 32


def make(seed: int, **overrides: object) -> Node:
    rng = random.Random(seed)
    settings: dict[str, object] = {
        "bind_host": "127.0.0.1",
        "bind_port": 0,
        "registry_port": 5000 + seed,
        **overrides,
    }
    cfg = NodeConfig(node_id=rng.randbytes(32), **settings)  # type: ignore[arg-type]
    return Node(cfg, rng=rng)


async def cluster(nursery: trio.Nursery, count: int, **overrides: object) -> list[Node]:
    nodes = [make(i + 1, **overrides) for i in range(count)]
    for node in nodes:
        await nursery.start(node.serve)
    for node in nodes[1:]:
        assert nodes[0].bound is not None
        await node.bootstrap([nodes[0].bound])
    return nodes


async def collect(router: DhtRouter, key: str) -> list[ProviderInfo]:
    async with router.resolve(key) as peers:
        return [p async for p in peers]


async def until(predicate: object, what: str) -> None:
    """Wait (in real time, without touching Trio's clock) for something that happens over UDP."""
    for _ in range(2500):
        if predicate():  # type: ignore[operator]
            return
        await trio.to_thread.run_sync(time.sleep, 0.002)
        await trio.testing.wait_all_tasks_blocked()
    raise AssertionError(f"never happened: {what}")


async def test_advertise_and_resolve_over_udp() -> None:
    async with trio.open_nursery() as nursery:
        nodes = await cluster(nursery, 6)
        assert all(n.router.ready() for n in nodes)
        await nodes[2].router.advertise([KEY])
        await until(lambda: nodes[2].statistics().lookups_active == 0, "announce finished")
        with trio.fail_after(5):  # a hang guard, not a speed assertion
            peers = await collect(nodes[4].router, KEY)
        provider = nodes[2].config
        assert peers == [ProviderInfo(provider.node_id, "127.0.0.1", provider.registry_port)]
        # never this node itself
        with trio.fail_after(5):
            assert await collect(nodes[2].router, KEY) == []
        stats = nodes[4].statistics()
        assert stats.table_size == 5 and stats.rpcs_sent > 0 and stats.bad_datagrams == 0
        assert {c.node_id for c in nodes[0].contacts()} == {
            n.config.node_id.hex() for n in nodes[1:]
        }
        nursery.cancel_scope.cancel()


async def test_a_miss_ends_at_once_without_any_timeout() -> None:
    async with trio.open_nursery() as nursery:
        # deadlines so long that waiting for one would trip the hang guard
        nodes = await cluster(nursery, 5, rpc_stall=60.0, rpc_timeout=120.0)
        with trio.fail_after(10):
            assert await collect(nodes[3].router, "sha256:" + "00" * 32) == []
        assert nodes[3].statistics().rpcs_timed_out == 0
        nursery.cancel_scope.cancel()


async def test_resolve_can_be_cancelled_at_any_point() -> None:
    async with trio.open_nursery() as nursery:
        nodes = await cluster(nursery, 4, rpc_stall=60.0, rpc_timeout=120.0)
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # swallows whatever it gets
        silent.bind(("127.0.0.1", 0))
        try:
            # a contact that never answers keeps the lookup open until we cancel it
            fake = make(99)
            ghost = Contact(fake.config.node_id, "127.0.0.1", silent.getsockname()[1])
            nodes[1].protocol.table.seen(ghost, trio.current_time())
            with trio.move_on_after(0.2) as scope:
                async with nodes[1].router.resolve("sha256:" + "11" * 32) as peers:
                    async for _ in peers:
                        pass
            assert scope.cancelled_caught
            assert nodes[1].statistics().lookups_active == 0
        finally:
            silent.close()
        nursery.cancel_scope.cancel()


async def test_garbage_and_floods_are_counted_and_dropped() -> None:
    async with trio.open_nursery() as nursery:
        nodes = await cluster(nursery, 3, rate=200.0, burst=100.0)
        target = nodes[0].bound
        assert target is not None
        rng = random.Random(5)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            raw.bind(("127.0.0.2", 0))  # its own source IP, so the flood limit is its own
            for size in (0, 1, 5, 100, 1199, 1400, 1500, 4000):
                raw.sendto(rng.randbytes(size), target)
            raw.sendto(b"\x94\x02\x01\x01" + bytes(34), target)  # unknown version
            await until(lambda: nodes[0].statistics().bad_datagrams >= 9, "garbage counted")
            for i in range(2000):
                raw.sendto(codec.encode(Ping(i, b"\x05" * 32)), target)
            await until(lambda: nodes[0].statistics().rate_limited > 0, "flood limited")
        await nodes[1].router.advertise([KEY])
        await until(lambda: nodes[1].statistics().lookups_active == 0, "announce finished")
        with trio.fail_after(5):
            assert len(await collect(nodes[2].router, KEY)) == 1  # everyone else still served
        nursery.cancel_scope.cancel()


async def test_psk_mismatch_keeps_nodes_apart() -> None:
    async with trio.open_nursery() as nursery:
        a, b, c = make(1, psk=b"cluster-a"), make(2, psk=b"cluster-a"), make(3, psk=b"other")
        for node in (a, b, c):
            await nursery.start(node.serve)
        assert a.bound is not None
        await b.bootstrap([a.bound])
        await c.bootstrap([a.bound])
        assert b.router.ready() and len(a.protocol.table) == 1
        assert not c.router.ready()
        assert a.statistics().bad_datagrams >= 1
        nursery.cancel_scope.cancel()


async def test_bootstrapping_through_itself_ends_without_a_timeout() -> None:
    async with trio.open_nursery() as nursery:
        node = make(1, rpc_timeout=120.0, rpc_stall=60.0)
        await nursery.start(node.serve)
        assert node.bound is not None
        with trio.fail_after(10):  # a hang guard: a timeout would take 120 s
            await node.bootstrap([node.bound])
        assert node.statistics().bad_datagrams == 0 and not node.router.ready()
        nursery.cancel_scope.cancel()


async def test_standalone_is_ready_alone_and_bootstrap_can_repeat() -> None:
    async with trio.open_nursery() as nursery:
        alone = make(1, standalone=True)
        await nursery.start(alone.serve)
        assert alone.router.ready()
        with trio.fail_after(5):
            await alone.bootstrap([])
            await alone.bootstrap([("localhost", 9)])  # nobody there: the attempt just ends
        assert await collect(alone.router, KEY) == []
        nursery.cancel_scope.cancel()


async def test_records_refresh_and_expire_on_the_mock_clock(
    mock_clock: trio.testing.MockClock,
) -> None:
    async def advance(seconds: float, step: float = 10.0) -> None:
        while seconds > 0:
            mock_clock.jump(min(step, seconds))
            seconds -= step
            await trio.testing.wait_all_tasks_blocked()  # the timers the jump made due run
            # let every exchange they set off finish, in real time, before time moves again
            await until(
                lambda: a.statistics().rpcs_in_flight == 0 == b.statistics().rpcs_in_flight,
                "exchanges finished",
            )

    async with trio.open_nursery() as nursery:
        a, b = make(1, refresh=540.0, ttl=600.0), make(2, refresh=540.0, ttl=600.0)
        for node in (a, b):
            await nursery.start(node.serve)
        assert a.bound is not None
        # UDP replies arrive in real time while the mock clock stands still
        await b.bootstrap([a.bound])
        kid = key_id(KEY)
        await a.router.advertise([KEY])
        await until(lambda: b.protocol.store.get(kid, trio.current_time()) != [], "record stored")
        await advance(1500.0)  # 2.5 ttls: only re-announcing keeps the record alive
        assert b.protocol.store.get(kid, trio.current_time()) != []
        assert len(b.protocol.store) == 1
        await a.router.withdraw([KEY])
        assert a.protocol.store.get(kid, trio.current_time()) == []
        await advance(700.0)
        assert b.protocol.store.get(kid, trio.current_time()) == []
        assert len(b.protocol.store) == 0  # expired records are dropped, not only hidden
        nursery.cancel_scope.cancel()


def test_a_lone_node_is_not_ready() -> None:
    router: DhtRouter = make(1).router
    assert router.ready() is False


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_ipv6_and_dual_stack_nodes_talk_to_ipv4_ones() -> None:
    async with trio.open_nursery() as nursery:
        dual = make(1, bind_host="::")
        v6 = make(2, bind_host="::1")
        v4 = make(3)
        for node in (dual, v6, v4):
            await nursery.start(node.serve)
        assert dual.bound is not None
        port = dual.bound[1]
        await v4.bootstrap([("127.0.0.1", port)])
        await v6.bootstrap([("::1", port)])
        assert len(dual.protocol.table) == 2
        await v4.router.advertise([KEY])
        await until(lambda: v4.statistics().lookups_active == 0, "announce finished")
        with trio.fail_after(5):
            peers = await collect(dual.router, KEY)
        assert [(p.host, p.port) for p in peers] == [("127.0.0.1", v4.config.registry_port)]
        nursery.cancel_scope.cancel()


async def test_wait_ready_wakes_when_the_table_gains_a_contact() -> None:
    a, b = make(1), make(2)
    woke = trio.Event()

    async def wait_for_b() -> None:
        await b.router.wait_ready()
        woke.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(a.serve)
        await nursery.start(b.serve)
        nursery.start_soon(wait_for_b)
        await trio.testing.wait_all_tasks_blocked()
        assert not woke.is_set() and not b.router.ready()
        assert a.bound is not None
        with trio.fail_after(5):  # a hang guard, not a speed assertion
            await b.bootstrap([a.bound])
            await woke.wait()
        assert b.router.ready()
        nursery.cancel_scope.cancel()
