"""Accepting registry connections: every pending one each time the listening socket is readable.

Why: an accept that yields to the scheduler after each connection (trio's `SocketListener`) takes
one connection per scheduler pass; with hundreds of busy connection tasks a pass is long, so a new
connection (a client that connects per request, containerd opening one more) waits in the kernel's
queue for seconds while requests on open connections are served.  Draining the queue at each
wakeup, up to `MAX_PER_WAKEUP`, puts new connections on the same footing as open ones.

Invariants: every accepted socket becomes a `trio.SocketStream` handed to `handler` in
`handler_nursery`, which closes it when the handler ends; errors of accept(2) that concern one
pending connection are skipped, a shortage of descriptors or memory pauses accepting for 100 ms
(as trio's `serve_listeners` does), anything else propagates.  The listening socket is the
caller's: this module accepts on its descriptor through a stdlib socket object that it detaches
(never closes) when it ends.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable, Callable

import trio

MAX_PER_WAKEUP = 256  # then other tasks run before the next batch
SHORTAGE_PAUSE = 0.1

# accept(2) errors about one pending connection (it went away, or a firewall refused it)
_ONE_CONNECTION = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
# accept(2) errors that say the process or the system is short of something for a moment
_SHORTAGE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})

logger = logging.getLogger("registry.http.accept")


async def _run(
    handler: Callable[[trio.SocketStream], Awaitable[None]], stream: trio.SocketStream
) -> None:
    try:
        await handler(stream)
    finally:
        await trio.aclose_forcefully(stream)


async def serve_connections(
    listening: trio.socket.SocketType,
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    handler_nursery: trio.Nursery,
) -> None:
    """Accept connections on `listening` until cancelled, each served by `handler(stream)` in
    `handler_nursery`."""
    accepting = socket.socket(listening.family, listening.type, fileno=listening.fileno())
    try:
        accepting.setblocking(False)
        while True:
            await trio.lowlevel.wait_readable(accepting)
            for _ in range(MAX_PER_WAKEUP):
                try:
                    conn, _address = accepting.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _ONE_CONNECTION:
                        continue
                    if exc.errno in _SHORTAGE:
                        logger.error(
                            "accept failed, retrying shortly",
                            extra={"error": errno.errorcode.get(exc.errno or 0, str(exc.errno))},
                        )
                        await trio.sleep(SHORTAGE_PAUSE)
                        break
                    raise
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
                handler_nursery.start_soon(_run, handler, stream)
            else:  # a full batch: let the connections just started run before the next one
                await trio.lowlevel.checkpoint()
    finally:
        accepting.detach()  # the descriptor stays the caller's
