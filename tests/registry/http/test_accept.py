"""The registry's accept loop (registry.http.accept) on real loopback sockets: every pending
connection is taken at one wakeup, each handed to the handler as a stream."""

from __future__ import annotations

import socket

import trio
import trio.testing

from registry.http.accept import serve_connections

PENDING = 20


async def test_every_pending_connection_is_accepted_at_one_wakeup() -> None:
    listening = trio.socket.socket()
    await listening.bind(("127.0.0.1", 0))
    listening.listen(128)
    port = listening.getsockname()[1]
    # connections the kernel completed while nobody accepted (the queue a busy server has)
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(PENDING)]
    seen_by_first: list[int] = []
    served: list[bytes] = []
    all_served = trio.Event()

    async with trio.open_nursery() as handlers:

        async def handler(stream: trio.SocketStream) -> None:
            if not seen_by_first:  # how many connections were taken before any handler ran
                seen_by_first.append(len(handlers.child_tasks))
            served.append(await stream.receive_some(16))
            if len(served) == PENDING:
                all_served.set()

        async with trio.open_nursery() as accept_nursery:
            accept_nursery.start_soon(serve_connections, listening, handler, handlers)
            await trio.testing.wait_all_tasks_blocked()
            for i, c in enumerate(clients):
                c.sendall(f"hello {i}".encode())
            with trio.fail_after(5):
                await all_served.wait()
            accept_nursery.cancel_scope.cancel()
    for c in clients:
        c.close()
    listening.close()
    # all 20 handler tasks existed when the first one ran: one wakeup took the whole queue
    # (one accept per scheduler pass, trio's SocketListener, gives 1 or 2 here)
    assert seen_by_first == [PENDING]
    assert sorted(served) == sorted(f"hello {i}".encode() for i in range(PENDING))


async def test_the_listening_socket_stays_the_callers() -> None:
    listening = trio.socket.socket()
    await listening.bind(("127.0.0.1", 0))
    listening.listen(8)
    port = listening.getsockname()[1]

    async def handler(stream: trio.SocketStream) -> None:
        await stream.send_all(b"x")

    async with trio.open_nursery() as handlers:
        async with trio.open_nursery() as accept_nursery:
            accept_nursery.start_soon(serve_connections, listening, handler, handlers)
            await trio.testing.wait_all_tasks_blocked()
            accept_nursery.cancel_scope.cancel()
    # after the loop ended the descriptor is still open and listening: a connect succeeds
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    assert listening.fileno() >= 0
    listening.close()
