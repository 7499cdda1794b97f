"""Dialling a peer with several addresses: the order (pure), and a race on loopback where one
address is a blackhole (a listener whose accept queue is full: the kernel drops further SYNs, as
a filtered address would) and the dial still succeeds after one stagger via the other address.
Trio's MockClock drives the stagger; the sockets are real."""

from __future__ import annotations

import functools
import socket
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from registry.http.client import PeerClient
from registry.http.dial import STAGGER, connect_first, dial_order
from registry.interfaces import Peer
from registry.mirror.job import MirrorSettings
from registry.serve.app import RegistrySettings
from tests.clocks import loopback_clock
from tests.fakes import MemoryNetwork
from tests.registry.conftest import StartNode
from tests.registry.mirror.test_mirror_peers import provider_and_client

BLACKHOLE = "127.0.0.2"


def test_dial_order_dedups_and_interleaves_families_first_one_first() -> None:
    assert dial_order([]) == []
    assert dial_order(["10.0.0.1"]) == ["10.0.0.1"]
    assert dial_order(["10.0.0.1", "10.0.0.1", ""]) == ["10.0.0.1"]
    assert dial_order(["10.0.0.1", "10.0.0.2", "fd00::1", "fd00::2"]) == [
        "10.0.0.1",
        "fd00::1",
        "10.0.0.2",
        "fd00::2",
    ]
    assert dial_order(["fd00::1", "10.0.0.1", "10.0.0.2"]) == ["fd00::1", "10.0.0.1", "10.0.0.2"]


def test_a_peer_lists_its_addresses_host_first() -> None:
    peer = Peer(b"\x01" * 32, "10.0.0.1", 5000, more_hosts=("fd00::1",))
    assert peer.hosts == ("10.0.0.1", "fd00::1")
    assert Peer(b"\x01" * 32, "10.0.0.1", 5000).hosts == ("10.0.0.1",)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return loopback_clock()  # virtual time (tests.clocks)


@pytest.fixture
def blackhole_port() -> Iterator[int]:
    """A port on BLACKHOLE where connects hang: its accept queue is full, so SYNs are dropped."""
    listener = socket.socket()
    listener.bind((BLACKHOLE, 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filler = socket.socket()
    filler.connect((BLACKHOLE, port))  # the one connection the queue holds; nobody accepts it
    try:
        yield port
    finally:
        filler.close()
        listener.close()


async def _listener_on(port: int, nursery: trio.Nursery) -> list[str]:
    """Accept on 127.0.0.1:`port` and record which peers connected."""
    seen: list[str] = []

    async def handler(stream: trio.SocketStream) -> None:
        seen.append("accepted")
        await stream.aclose()

    await nursery.start(functools.partial(trio.serve_tcp, handler, port, host="127.0.0.1"))
    return seen


async def test_a_blackholed_address_costs_one_stagger(
    clock: trio.testing.MockClock, nursery: trio.Nursery, blackhole_port: int
) -> None:
    await _listener_on(blackhole_port, nursery)
    started = trio.current_time()
    with trio.fail_after(5):
        stream = await connect_first([BLACKHOLE, "127.0.0.1"], blackhole_port)
    elapsed = trio.current_time() - started
    assert stream.socket.getpeername() == ("127.0.0.1", blackhole_port)
    await stream.aclose()
    assert STAGGER <= elapsed < 2 * STAGGER, elapsed  # not the kernel's 1 s SYN retry


async def test_without_a_second_address_the_blackhole_hangs(
    clock: trio.testing.MockClock, blackhole_port: int
) -> None:
    """The control: the same blackhole alone is not reached within many staggers."""
    with trio.move_on_after(10 * STAGGER) as waited:
        await connect_first([BLACKHOLE], blackhole_port)
    assert waited.cancelled_caught


async def test_a_refused_address_hands_over_at_once(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nobody listens on 127.0.0.3:port
    await _listener_on(port, nursery)
    started = trio.current_time()
    stream = await connect_first(["127.0.0.3", "127.0.0.1"], port)
    assert trio.current_time() - started < STAGGER  # no waiting out the stagger
    await stream.aclose()


async def test_every_address_failing_names_each(clock: trio.testing.MockClock) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(
        OSError, match=r"127\.0\.0\.3: .*127\.0\.0\.1: |127\.0\.0\.1: .*127\.0\.0\.3: "
    ):
        await connect_first(["127.0.0.3", "127.0.0.1"], port)


async def test_a_peer_whose_first_address_is_a_blackhole_serves_fast(
    clock: trio.testing.MockClock, start_node: StartNode, network: MemoryNetwork
) -> None:
    """The whole mirror path: the provider is advertised with a blackholed address first and its
    real one second; the pull takes about one stagger, not the 2 s response timeout."""
    settings = RegistrySettings(
        mirror=MirrorSettings(resolve_timeout=0.5, response_timeout=2.0, hedge_racers=1)
    )
    provider, content, client = await provider_and_client(start_node, network, settings)
    listener = socket.socket()
    listener.bind((BLACKHOLE, provider.port))  # same port, another address: the blackhole
    listener.listen(0)
    filler = socket.socket()
    filler.connect((BLACKHOLE, provider.port))
    try:
        network.remove(content.layer, provider.peer)
        two_addresses = Peer(
            provider.peer.node_id, BLACKHOLE, provider.port, more_hosts=("127.0.0.1",)
        )
        network.add(content.layer, two_addresses)
        async with client.client() as http:
            started = trio.current_time()
            response = await http.get(f"/v2/library/app/blobs/{content.layer}?ns=docker.io")
            elapsed = trio.current_time() - started
    finally:
        filler.close()
        listener.close()
    assert response.status_code == 200
    assert response.content == content.layer_bytes
    assert STAGGER <= elapsed < 0.5, elapsed


async def test_the_address_that_won_is_dialled_first_next_time(
    clock: trio.testing.MockClock, nursery: trio.Nursery, blackhole_port: int
) -> None:
    """A peer whose first address is a blackhole costs one stagger for its first connection
    only: the client remembers which address answered."""

    async def answer(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"
        )
        await stream.aclose()

    await nursery.start(functools.partial(trio.serve_tcp, answer, blackhole_port, host="127.0.0.1"))
    client = PeerClient()
    took = []
    for _ in range(3):  # `connection: close`: each request dials anew
        started = trio.current_time()
        with trio.fail_after(5):
            async with client.request(
                BLACKHOLE, blackhole_port, "GET", "/x", also=("127.0.0.1",)
            ) as response:
                assert await response.receive() == b"ok"
        took.append(trio.current_time() - started)
    assert took[0] >= STAGGER
    assert took[1] < STAGGER and took[2] < STAGGER, took
    await client.aclose()
