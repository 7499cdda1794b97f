"""The metrics/debug HTTP server (`--metrics-addr`, default :9090): `/metrics`, `/debug/tasks`, and
the debug page `/debug/web` kept live over a websocket.

Why a separate port from the registry: scrapers and humans should not compete with containerd's
pulls, and the debug views can be switched off (`--debug-web-enabled=false`) without touching the
mirror. `serve_app` is the one place that turns a Quart-Trio app and a listen address into a
Hypercorn server with graceful shutdown inside the caller's nursery.
"""

from __future__ import annotations

import functools
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from quart import Response, request, websocket
from quart_trio import QuartTrio

from agent.config import ListenAddr
from agent.observability.debug import (
    DebugState,
    count_tasks,
    render_task_tree,
    task_tree,
    task_tree_json,
)

logger = logging.getLogger(__name__)

LIVE_INTERVAL = 2.0
# live viewers of the debug page at once: each costs a snapshot every LIVE_INTERVAL; one more
# is refused with a 503 before the websocket is accepted
MAX_VIEWERS = 8


def _dual_stack_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::", 0))
    except OSError:
        return False
    return True


def bind_spec(addr: ListenAddr) -> str:
    """Hypercorn bind string; an empty host binds every interface (both families when possible)."""
    if addr.host:
        return str(addr)
    return f"[::]:{addr.port}" if _dual_stack_available() else f"0.0.0.0:{addr.port}"


def bound_port(urls: list[str]) -> int:
    """Port of the first URL Hypercorn reports (`http://127.0.0.1:47100`)."""
    return int(urls[0].rsplit(":", 1)[1].rstrip("/"))


async def serve_app(
    app: Any,
    addr: ListenAddr,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    grace: float = 5.0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on `addr` until `shutdown_trigger` returns, then drain for up to `grace` s."""
    cfg = HypercornConfig()
    cfg.bind = [bind_spec(addr)]
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("hypercorn.error")
    cfg.graceful_timeout = grace
    cfg.include_server_header = False

    async with trio.open_nursery() as nursery:
        urls: list[str] = await nursery.start(
            functools.partial(serve, app, cfg, shutdown_trigger=shutdown_trigger)
        )
        task_status.started(bound_port(urls))


def _page() -> str:
    return (resources.files("agent.web") / "debug.html").read_text(encoding="utf-8")


def create_metrics_app(
    debug: DebugState | None = None, *, web_enabled: bool = True, max_viewers: int = MAX_VIEWERS
) -> QuartTrio:
    """Quart-Trio app of the metrics port; the debug page and websocket only when `web_enabled`
    (at most `max_viewers` websocket viewers at once)."""
    app = QuartTrio("spegla-metrics")

    @app.route("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)

    @app.route("/debug/tasks")
    async def tasks() -> Response:
        tree = task_tree()
        if request.args.get("format") == "json":
            services = {} if debug is None else debug.services()
            body = json.dumps(
                {"tasks": count_tasks(tree), "root": task_tree_json(tree), "services": services}
            )
            return Response(body, content_type="application/json")
        return Response(render_task_tree(tree) + "\n", content_type="text/plain; charset=utf-8")

    if not web_enabled or debug is None:
        return app
    state = debug

    @app.route("/debug/web")
    @app.route("/debug/web/")
    async def page() -> Response:
        return Response(_page(), content_type="text/html; charset=utf-8")

    @app.route("/debug/web/stats")
    async def stats() -> Response:
        return Response(json.dumps(state.snapshot()), content_type="application/json")

    @app.route("/debug/web/metadata")
    async def metadata() -> Response:
        return Response(
            json.dumps({"node": {"id": state.node_id}}), content_type="application/json"
        )

    @app.websocket("/debug/web/ws")
    async def live() -> Response | None:
        state.unsubscribe_closed()  # viewers that left are not counted
        if state.viewers >= max_viewers:
            body = f"more than {max_viewers} live viewers; try again later\n"
            return Response(body, status=503, content_type="text/plain; charset=utf-8")
        events = state.subscribe()
        try:
            async with events:
                await websocket.accept()
                await websocket.send(json.dumps(state.snapshot()))
                while True:
                    event: dict[str, Any] | None = None
                    with trio.move_on_after(LIVE_INTERVAL):
                        event = await events.receive()
                    if event is not None and event.get("type") != "ping":
                        await websocket.send(json.dumps(event))
                    await websocket.send(json.dumps(state.snapshot()))
        finally:
            state.unsubscribe_closed()

    return app


async def serve_ok_until_signalled(addr: ListenAddr) -> None:
    """`spegla cleanup --addr`: answer 200 on every path (cleanup-wait probe) until SIGTERM."""
    import signal

    app = QuartTrio("spegla-cleanup")

    @app.route("/", defaults={"path": ""})
    @app.route("/<path:path>")
    async def ok(path: str) -> Response:
        return Response("ok\n", content_type="text/plain")

    stop = trio.Event()

    async def wait_signal() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                stop.set()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_signal)
        await nursery.start(
            functools.partial(serve_app, app, addr, shutdown_trigger=stop.wait, grace=1.0)
        )
        logger.info("cleanup done; answering readiness probes", extra={"addr": str(addr)})
