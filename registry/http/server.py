"""A generic ASGI server on h11: listens, accepts, reads requests, runs any ASGI 3 application.

Why: the application is the registry; the transport knows nothing of it.  Each connection is a
`ServerConnection` (h11 is the only request parser); each request runs through
`registry.http.asgi` (with the zero-copy `pathsend` / `zerocopysend` extensions); the server
runs the application's `lifespan` itself (`registry.http.lifespan`).

Invariants:
- Connections are accepted in batches at each wakeup of the listening socket
  (`registry.http.accept`), every connection task in the server's nursery.
- Over `limits.max_connections` open connections (0: no cap) a new connection gets a 503 with
  Retry-After, written before any request is read, then is closed; at most a quarter of the cap
  are being refused at once, more are closed without a word.
- A request head must arrive within `head_timeout` once begun; a connection may idle
  `keep_alive_timeout` between requests; every wait for the client to take response bytes ends
  after `limits.send_timeout` (the connection is cut).
- Shutdown (`shutdown_trigger` returned): the listener closes, idle connections close at once,
  running requests get `graceful_timeout`, then the lifespan shuts down.
- No state outside a server's own objects: counters live in the `ServerStats` the caller
  passes, the Date header cache is the server's.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from registry.http.accept import serve_connections
from registry.http.asgi import AsgiApp, run_http, socket_addresses
from registry.http.connection import (
    DEFAULT_SEND_TIMEOUT,
    HttpDates,
    ServerConnection,
    is_client_gone,
)
from registry.http.lifespan import Lifespan

__all__ = [
    "DEFAULT_BACKLOG",
    "DEFAULT_MAX_CONNECTIONS",
    "OVER_CAPACITY",
    "ConnectionLimits",
    "ServerStats",
    "listen",
    "serve_asgi",
    "serve_asgi_on",
]

DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_BACKLOG = 1024  # the kernel caps it at net.core.somaxconn
REFUSAL_LINGER = 1.0  # a refused connection is closed after at most this long

logger = logging.getLogger(__name__)

_REFUSAL_BODY = b"too many connections to this registry, try again later\n"
# written before a request was read, so not through h11 (it frames answers to requests only)
OVER_CAPACITY = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: " + str(len(_REFUSAL_BODY)).encode() + b"\r\n"
    b"retry-after: 1\r\n"
    b"connection: close\r\n"
    b"\r\n" + _REFUSAL_BODY
)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The connection cap (0: none; beyond it a clean 503) and the send deadline (a client that
    takes no response bytes for this long is cut)."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    send_timeout: float = DEFAULT_SEND_TIMEOUT


class ServerStats:
    """Running counts of one server: requests read (a memory trimmer watches it move) and
    connections refused over the cap.  Only the server's task writes them."""

    def __init__(self) -> None:
        self.requests = 0
        self.refused = 0

    def snapshot(self) -> dict[str, int]:
        return {"requests": self.requests, "refused": self.refused}


class _Server:
    def __init__(
        self,
        app: AsgiApp,
        *,
        limits: ConnectionLimits,
        head_timeout: float,
        keep_alive_timeout: float,
        stats: ServerStats,
        state: dict[str, Any],
        is_expected: Callable[[BaseException], bool],
    ) -> None:
        self.app = app
        self.limits = limits
        self.head_timeout = head_timeout
        self.keep_alive_timeout = keep_alive_timeout
        self.stats = stats
        self.state = state
        self.is_expected = is_expected
        self.dates = HttpDates()
        self.connections: set[ServerConnection] = set()
        self.refusing = 0  # connections being answered 503 (over the cap) right now
        self.closing = False

    def close_idle(self) -> None:
        self.closing = True
        for conn in self.connections:
            conn.close_idle()

    async def connection(self, stream: trio.SocketStream) -> None:
        """Serve one client connection; whatever happens, only this connection is affected."""
        limits = self.limits
        if limits.max_connections and len(self.connections) >= limits.max_connections:
            await self._refuse(stream)
            return
        conn = ServerConnection(
            stream,
            head_timeout=self.head_timeout,
            idle_timeout=self.keep_alive_timeout,
            send_timeout=limits.send_timeout,
            dates=self.dates,
        )
        if self.closing:
            conn.close_idle()
        self.connections.add(conn)
        try:
            client, server = socket_addresses(stream)
            while (request := await conn.next_request()) is not None:
                self.stats.requests += 1
                await run_http(
                    self.app,
                    conn,
                    request,
                    client=client,
                    server=server,
                    state=self.state,
                    is_expected=self.is_expected,
                )
                if not conn.next_cycle():
                    break
        except Exception as exc:
            if not is_client_gone(exc):
                logger.exception("connection failed")
        finally:
            self.connections.discard(conn)
            await conn.close()

    async def _refuse(self, stream: trio.SocketStream) -> None:
        """Over the cap: a 503 with Retry-After before any request is read, then close (a
        mirror client such as containerd takes it as "next host")."""
        self.stats.refused += 1
        with trio.CancelScope(shield=True):
            if self.refusing >= max(1, self.limits.max_connections // 4):
                await stream.aclose()
                return
            self.refusing += 1
            try:
                with trio.move_on_after(REFUSAL_LINGER):
                    try:
                        await stream.send_all(OVER_CAPACITY)
                        await stream.send_eof()
                        while await stream.receive_some(4096):
                            pass  # unread request bytes would make the close a reset
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
            finally:
                self.refusing -= 1
                await stream.aclose()


async def listen(host: str, port: int, backlog: int = DEFAULT_BACKLOG) -> trio.socket.SocketType:
    """A listening TCP socket on host:port (IPv6 hosts also take IPv4 connections)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        await sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _never(_exc: BaseException) -> bool:
    return False


async def serve_asgi(
    app: AsgiApp,
    host: str,
    port: int,
    *,
    limits: ConnectionLimits | None = None,
    head_timeout: float = 10.0,
    graceful_timeout: float = 3.0,
    keep_alive_timeout: float = 30.0,
    backlog: int = DEFAULT_BACKLOG,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    stats: ServerStats | None = None,
    is_expected: Callable[[BaseException], bool] = _never,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on host:port until `shutdown_trigger` returns (or cancellation);
    `task_status.started(bound_port)` once the application started and connections are taken.

    `is_expected(exc)`: application errors that are meant (not logged as failures)."""
    sock = await listen(host, port, backlog)
    await serve_asgi_on(
        app,
        sock,
        limits=limits,
        head_timeout=head_timeout,
        graceful_timeout=graceful_timeout,
        keep_alive_timeout=keep_alive_timeout,
        shutdown_trigger=shutdown_trigger,
        stats=stats,
        is_expected=is_expected,
        task_status=task_status,
    )


async def serve_asgi_on(
    app: AsgiApp,
    sock: trio.socket.SocketType,
    *,
    limits: ConnectionLimits | None = None,
    head_timeout: float = 10.0,
    graceful_timeout: float = 3.0,
    keep_alive_timeout: float = 30.0,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    stats: ServerStats | None = None,
    is_expected: Callable[[BaseException], bool] = _never,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`serve_asgi` on a socket that listens already; the server closes it."""
    with sock:
        lifespan_state: dict[str, Any] = {}
        lifespan = Lifespan(app, lifespan_state)
        server = _Server(
            app,
            limits=limits or ConnectionLimits(),
            head_timeout=head_timeout,
            keep_alive_timeout=keep_alive_timeout,
            stats=stats or ServerStats(),
            state=lifespan_state,
            is_expected=is_expected,
        )
        async with trio.open_nursery() as lifespan_nursery:
            await lifespan_nursery.start(lifespan.run)
            await lifespan.startup()
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(serve_connections, sock, server.connection, connections)
                    task_status.started(int(sock.getsockname()[1]))
                    if shutdown_trigger is not None:
                        await shutdown_trigger()
                    else:
                        await trio.sleep_forever()
                    accepting.cancel_scope.cancel()
                sock.close()
                server.close_idle()
                connections.cancel_scope.deadline = trio.current_time() + graceful_timeout
            await lifespan.shutdown()
            lifespan_nursery.cancel_scope.cancel()
