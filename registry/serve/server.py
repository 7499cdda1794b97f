"""Serving the registry app: on our h11 ASGI server (the default) or on Hypercorn's trio worker.

Why a module of its own: the agent starts the registry with `nursery.start(serve_registry, ...)`
and needs the bound port back (port 0 in tests) and a graceful stop (shutdown_trigger).  Both
servers run the very same app; ours (`registry.http.server`) offers the ASGI zero-copy
extensions, so file bodies leave by sendfile, while under Hypercorn they stream.  A body cut short
on purpose (`BodyCut`: its cause was logged where it happened) is expected by either server, not
reported again with a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Literal

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart_trio import QuartTrio

from registry.http.connection import is_client_gone
from registry.http.server import ConnectionLimits, ServerStats, serve_asgi
from registry.serve.app import Registry, create_app
from registry.serve.inflight import IngestBroken
from registry.serve.responses import BodyCut

__all__ = ["ServerKind", "hypercorn_config", "run_registry", "serve_registry"]

logger = logging.getLogger(__name__)
ServerKind = Literal["h11", "hypercorn"]
BACKLOG = 1024  # the accept queue: saturation (hundreds of clients reconnecting) must not reset


def expected_failure(exc: BaseException | None) -> bool:
    """A response cut on purpose, or a client that went away: nothing to report again."""
    if isinstance(exc, BodyCut | IngestBroken):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(expected_failure(inner) for inner in exc.exceptions)
    return exc is not None and is_client_gone(exc)


class _DropCutBodies(logging.Filter):
    """Hypercorn logs an app's failure with a traceback ("Error in ASGI Framework")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not expected_failure(record.exc_info[1] if record.exc_info else None)


def _error_log() -> logging.Logger:
    """Hypercorn's error log for one config: a logger of its own (not in the logging registry)
    whose records go on to "hypercorn.error", minus the cut bodies."""
    log = logging.Logger("hypercorn.error")
    log.parent = logging.getLogger("hypercorn.error")
    log.addFilter(_DropCutBodies())
    return log


def hypercorn_config(host: str, port: int, *, graceful_timeout: float = 3.0) -> Config:
    config = Config()
    host_text = f"[{host}]" if ":" in host else host
    config.bind = [f"{host_text}:{port}"]
    config.graceful_timeout = graceful_timeout
    config.keep_alive_timeout = 30.0
    config.backlog = BACKLOG  # the kernel caps it at net.core.somaxconn
    config.include_server_header = False
    config.accesslog = None
    config.errorlog = _error_log()
    return config


async def serve_registry(
    app: QuartTrio,
    host: str,
    port: int,
    *,
    server: ServerKind = "h11",
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    graceful_timeout: float = 3.0,
    head_timeout: float = 10.0,
    limits: ConnectionLimits | None = None,
    stats: ServerStats | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on host:port until `shutdown_trigger` returns; `task_status.started(port)`.

    `server`: "h11" (ours, with zero-copy bodies; `limits`, `head_timeout` and `stats` are its)
    or "hypercorn"."""
    if server == "h11":

        async def started(task_status: trio.TaskStatus[int]) -> None:
            await serve_asgi(
                app,  # type: ignore[arg-type]  # (Quart types its ASGI messages as TypedDicts)
                host,
                port,
                limits=limits,
                head_timeout=head_timeout,
                graceful_timeout=graceful_timeout,
                keep_alive_timeout=30.0,
                backlog=BACKLOG,
                shutdown_trigger=shutdown_trigger,
                stats=stats,
                is_expected=expected_failure,
                task_status=task_status,
            )

        async with trio.open_nursery() as nursery:
            bound = await nursery.start(started)
            logger.info("registry listening", extra={"address": f"{host}:{bound}"})
            task_status.started(bound)
        return
    config = hypercorn_config(host, port, graceful_timeout=graceful_timeout)
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            lambda task_status: serve(
                app, config, shutdown_trigger=shutdown_trigger, task_status=task_status
            )
        )
        logger.info("registry listening", extra={"address": binds[0]})
        task_status.started(int(binds[0].rsplit(":", 1)[1]))


async def run_registry(
    registry: Registry,
    host: str,
    port: int,
    *,
    server: ServerKind = "h11",
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    **options: object,
) -> None:
    """`registry`'s task tree and its app served, together (tests, benchmarks, tools; the agent
    supervises the two separately).  `options`: `serve_registry`'s."""
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)

        async def serve_then_stop(task_status: trio.TaskStatus[int]) -> None:
            await serve_registry(
                create_app(registry),
                host,
                port,
                server=server,
                task_status=task_status,
                **options,  # type: ignore[arg-type]
            )
            nursery.cancel_scope.cancel()  # served until shutdown: the task tree ends too

        task_status.started(await nursery.start(serve_then_stop))
