"""Serving the registry app: Hypercorn's trio worker inside the caller's nursery.

Why a module of its own: the agent starts the registry with `nursery.start(serve_registry, ...)`
and needs the bound port back (port 0 in tests) and a graceful stop (shutdown_trigger).  With
`zero_copy=True` (the default) the listener is `registry.serve.front_door`'s front door, which
sends local
blobs with sendfile and hands every other connection to Hypercorn; with False it is plain
`hypercorn.trio.serve`.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart_trio import QuartTrio

from registry.serve.app import MirrorAborted
from registry.serve.front_door import ConnectionLimits, FastPathStats, serve_front_door

__all__ = ["hypercorn_config", "serve_registry"]

logger = logging.getLogger(__name__)


class _DropMirrorAborts(logging.Filter):
    """A mirrored body cut short on purpose (bad peer bytes) is logged by the forwarder; Hypercorn
    would add a traceback ("Error in ASGI Framework") for the same event."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _contains_abort(record.exc_info[1] if record.exc_info else None)


def _contains_abort(exc: BaseException | None) -> bool:
    if isinstance(exc, MirrorAborted):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return any(_contains_abort(inner) for inner in exc.exceptions)
    return False


_ERROR_LOG = logging.getLogger("hypercorn.error")
_ERROR_LOG.addFilter(_DropMirrorAborts())


def hypercorn_config(host: str, port: int, *, graceful_timeout: float = 3.0) -> Config:
    config = Config()
    host_text = f"[{host}]" if ":" in host else host
    config.bind = [f"{host_text}:{port}"]
    config.graceful_timeout = graceful_timeout
    config.keep_alive_timeout = 30.0
    # the accept queue: the front door accepts one connection per scheduler pass, so under
    # saturation (hundreds of clients reconnecting) Hypercorn's 100 overflows and connects are
    # dropped or reset; the kernel caps it at net.core.somaxconn
    config.backlog = 1024
    config.include_server_header = False
    config.accesslog = None
    config.errorlog = _ERROR_LOG
    return config


async def serve_registry(
    app: QuartTrio,
    host: str,
    port: int,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    graceful_timeout: float = 3.0,
    zero_copy: bool = True,
    stats: FastPathStats | None = None,
    head_timeout: float = 10.0,
    limits: ConnectionLimits | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on host:port until `shutdown_trigger` returns; `task_status.started(port)`.

    `limits` (connection cap, send deadline) apply to the zero-copy front door."""
    config = hypercorn_config(host, port, graceful_timeout=graceful_timeout)
    if zero_copy:
        sock = await _listen(host, port, config.backlog)
        bound = sock.getsockname()[1]
        logger.info("registry listening", extra={"address": f"{host}:{bound}"})
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: serve_front_door(
                    app,
                    config,
                    sock,
                    shutdown_trigger=shutdown_trigger,
                    stats=stats or FastPathStats(),
                    head_timeout=head_timeout,
                    limits=limits,
                    task_status=task_status,
                )
            )
            task_status.started(bound)
        return

    async def started(binds: list[str]) -> None:
        bound = int(binds[0].rsplit(":", 1)[1])
        logger.info("registry listening", extra={"address": binds[0]})
        task_status.started(bound)

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            lambda task_status: serve(
                app, config, shutdown_trigger=shutdown_trigger, task_status=task_status
            )
        )
        await started(binds)


async def _listen(host: str, port: int, backlog: int) -> trio.socket.SocketType:
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
