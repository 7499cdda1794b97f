"""The trust rules through the Trio driver on real loopback UDP: a raw socket claiming an honest
node's id re-points nothing and deletes nothing; a node that really moved is followed."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from dht import codec
from dht.codec import AddProvider, Message, Ping, Pong
from dht.ids import Contact, ProviderInfo, key_id
from dht.node import Node
from dht.protocol import PONG_SIZE
from tests.dht.test_node import KEY, make, until

ROGUE_IP = "127.0.0.3"  # its own source IP (the flood limit and tokens are per IP)


@contextmanager
def rogue() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((ROGUE_IP, 0))
        sock.setblocking(False)
        yield sock


def receive(sock: socket.socket) -> list[Message]:
    out = []
    while True:
        try:
            data, _ = sock.recvfrom(2048)
        except BlockingIOError:
            return out
        out.append(codec.decode(data))


async def ask(sock: socket.socket, msg: Message, to: tuple[str, int]) -> list[Message]:
    """Send `msg` from the rogue socket; what came back once the node is idle."""
    receive(sock)
    sock.sendto(codec.encode(msg), to)
    got: list[Message] = []
    await until(lambda: bool(got.extend(receive(sock)) or got), "an answer")
    return got


async def test_a_raw_socket_with_an_honest_id_repoints_and_deletes_nothing() -> None:
    async with trio.open_nursery() as nursery:
        a, b = make(1), make(2)
        await nursery.start(a.serve)
        await nursery.start(b.serve)
        assert a.bound is not None and b.bound is not None
        await b.bootstrap([a.bound])
        honest = b.config.node_id
        await until(lambda: a.protocol.table.get(honest) is not None, "a knows b")
        await b.router.advertise([KEY])
        kid = key_id(KEY)
        await until(lambda: a.protocol.store.get(kid, trio.current_time()) != [], "b's record")
        record = ProviderInfo(honest, "127.0.0.1", b.config.registry_port)
        with rogue() as sock:
            rogue_addr = sock.getsockname()
            # the rogue gets a token for its own IP, then speaks with the honest id
            [pong] = await ask(sock, codec.padded(Ping(1, honest), PONG_SIZE), a.bound)
            assert isinstance(pong, Pong) and pong.token
            nonces = await ask(sock, Ping(2, honest, pong.token), a.bound)
            for nonce in nonces:  # it even echoes the move check's nonce from its address
                if isinstance(nonce, Ping):
                    sock.sendto(codec.encode(Pong(nonce.txid, honest, b"")), a.bound)
            await until(lambda: len(a.protocol.relocations) == 0, "the move check ended")
            assert a.protocol.table.get(honest) == Contact(honest, *b.bound)
            assert a.statistics().moves_refused == 1
            # a withdrawal and a record in the honest id's name touch only the rogue's own slot
            token = pong.token
            for ttl in (600, 0):
                add = AddProvider(3 + ttl, honest, kid, 6666, ttl, token)
                [ack] = [m for m in await ask(sock, add, a.bound) if isinstance(m, codec.Ack)]
                assert ack.stored
            assert a.protocol.store.get(kid, trio.current_time()) == [record]
            assert rogue_addr[0] == ROGUE_IP
        nursery.cancel_scope.cancel()


async def test_a_node_that_really_moved_is_followed_over_udp() -> None:
    async with trio.open_nursery() as nursery:
        a = make(1)
        await nursery.start(a.serve)
        assert a.bound is not None
        b = make(2)
        honest = b.config.node_id
        async with trio.open_nursery() as b_scope:
            await b_scope.start(b.serve)
            await b.bootstrap([a.bound])
            await until(lambda: a.protocol.table.get(honest) is not None, "a knows b")
            old = b.bound
            b_scope.cancel_scope.cancel()  # b's process ends; it comes back on another port
        moved: Node = make(2)
        assert moved.config.node_id == honest
        await nursery.start(moved.serve)
        assert moved.bound is not None and moved.bound != old
        await moved.bootstrap([a.bound])
        await until(
            lambda: a.protocol.table.get(honest) == Contact(honest, *moved.bound), "followed"
        )
        nursery.cancel_scope.cancel()
