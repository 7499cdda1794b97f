"""The peer client's pool of idle keep-alive connections is bounded in time and in peers:
an idle connection older than `idle_timeout` is closed, not reused, and pools of the least
recently used peers beyond `max_hosts` are closed.  Real keep-alive servers on loopback; the
pool's clock is a MockClock moved by hand."""

from __future__ import annotations

import functools

import trio
import trio.lowlevel
import trio.testing

from registry.http.client import PeerClient
from tests.registry.conftest import LOOPBACK, answer_each_request


class KeepAliveServer:
    """Answers every request `200 ok` on the same connection; counts connections and closes."""

    def __init__(self) -> None:
        self.accepted = 0
        self.closed = 0
        self.port = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        try:
            await answer_each_request(stream, self._ok)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.closed += 1

    @staticmethod
    async def _ok(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")


async def start(nursery: trio.Nursery) -> KeepAliveServer:
    server = KeepAliveServer()
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, server.handle, 0, host=LOOPBACK)
    )
    server.port = listeners[0].socket.getsockname()[1]
    return server


async def fetch(client: PeerClient, server: KeepAliveServer) -> bytes:
    async with client.request(LOOPBACK, server.port, "GET", "/v2/") as response:
        body = b""
        while (chunk := await response.receive()) is not None:
            body += chunk
    return body


async def settle(server: KeepAliveServer, closed: int) -> None:
    for _ in range(100_000):  # the mock clock stands still: bounded by passes, not time
        if server.closed >= closed:
            return
        await trio.lowlevel.checkpoint()


async def test_idle_connections_expire(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    server = await start(nursery)
    client = PeerClient(idle_timeout=20.0)
    assert await fetch(client, server) == b"ok"
    mock_clock.jump(5)
    assert await fetch(client, server) == b"ok"
    assert (server.accepted, client.idle_connections()) == (1, 1)  # reused while fresh
    mock_clock.jump(21)
    assert await fetch(client, server) == b"ok"
    await settle(server, 1)
    assert (server.accepted, server.closed) == (2, 1)  # the stale one was closed, not tried
    await client.aclose()


async def test_pools_are_kept_for_a_bounded_number_of_peers(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    servers = [await start(nursery) for _ in range(4)]
    client = PeerClient(max_hosts=2)
    for server in servers:
        assert await fetch(client, server) == b"ok"
    assert client.idle_connections() == 2
    await settle(servers[1], 1)
    # the two least recently used peers' connections were closed, the last two kept
    assert [s.closed for s in servers] == [1, 1, 0, 0]
    assert await fetch(client, servers[3]) == b"ok"
    assert servers[3].accepted == 1
    await client.aclose()
