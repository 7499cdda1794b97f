"""`spegla registry`: the node agent as one Trio nursery of supervised services.

Why this shape: every long-lived task is a named service under one `Supervisor` (signals, DHT
node, debug feed, memory trim, metrics/debug server, registry server, bootstrap source and join,
containerd state tracker, ready watch), started with `nursery.start`, so readiness flows upwards,
`/debug/tasks` shows each service by name with its own tasks below it, and a crash is restarted
with backoff or, when it keeps happening, ends the process non-zero. SIGTERM/SIGINT stop the HTTP
servers from accepting, let in-flight requests finish within the grace period and exit 0; a second
signal cancels at once. SIGUSR1 prints the live task tree to stderr.

The containerd side and the HTTP registry app come from typed factories (`BackendFactory`,
`AppFactory`, `ServeRegistry`) so the same wiring runs in-process in tests with in-memory doubles.
Readiness is a condition over flags its inputs set (`agent.flag`); "agent ready" is awaited.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from agent.advertising.peer_router import registry_router
from agent.config import ConfigError, RegistryConfig, grace_seconds
from agent.flag import Flag
from agent.node.bootstrap import Bootstrapper, SelfInfo, keep_joined
from agent.node.identity import load_or_create_node_id
from agent.node.setup import (
    detect_advertise_addr,
    make_bootstrapper,
    more_addresses,
    read_cluster_key,
    trust_summary,
)
from agent.observability.debug import DebugState, render_task_tree, task_tree, watch_mirror_metrics
from agent.observability.dht_metrics import export as export_dht_metrics
from agent.observability.metrics_server import create_metrics_app, serve_app
from agent.runtime.memory_trim import glibc_malloc_trim, trim_when_idle
from agent.runtime.supervise import RestartPolicy, ServiceFailed, Supervisor
from agent.runtime.wiring import (
    AppFactory,
    AppParts,
    Backend,
    BackendFactory,
    ServeRegistry,
    containerd_backend,
    default_registry,
    default_serve_with_stats,
)
from registry.burst.claim_supply import ClaimParticipation
from registry.events import MirrorEvents
from registry.http.server import ServerStats
from registry.interfaces import Router
from registry.serve.inflight import InflightUploads

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)
METRICS_GRACE = 2.0  # drain of the metrics/debug server on shutdown, whatever --shutdown-grace says


@dataclass(frozen=True, slots=True)
class AgentHandle:
    """What `nursery.start(run_agent, ...)` reports once every service is up."""

    node_id: bytes
    registry_port: int
    router_port: int
    metrics_port: int


@dataclass(slots=True)
class Readiness:
    """containerd reachable + state advertised once + DHT table non-empty (or alone by config)."""

    router: Router
    router_ready: Callable[[], Awaitable[None]]  # returns once router.ready() (awaited, not polled)
    connected: Flag = field(default_factory=Flag)
    advertised: Flag = field(default_factory=Flag)
    stopping: bool = False  # set on SIGTERM: take this node out of rotation while it drains

    def __call__(self) -> bool:
        return (
            not self.stopping
            and bool(self.advertised)
            and bool(self.connected)
            and self.router.ready()
        )

    def detail(self) -> dict[str, bool]:
        return {
            "containerd": bool(self.connected),
            "advertised": bool(self.advertised),
            "router": self.router.ready(),
            "running": not self.stopping,
        }

    async def wait(self) -> None:
        """Return once ready; each input is awaited in turn (none is polled), then re-checked."""
        while not self():
            if self.stopping:
                await trio.sleep_forever()  # draining: never ready again
            await self.advertised.wait()
            await self.connected.wait()
            await self.router_ready()


@dataclass(slots=True)
class Hooks:
    """Injection points for tests; defaults build the real thing."""

    backend: BackendFactory | None = None
    app: AppFactory | None = None
    serve_registry: ServeRegistry | None = None
    bootstrapper: Bootstrapper | None = None
    policy: RestartPolicy | None = None


# --- the agent ------------------------------------------------------------------------------------


async def _signals(
    shutdown: trio.Event,
    root: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The first SIGTERM/SIGINT sets `shutdown`, a second cancels `root`; SIGUSR1 prints the task
    tree. Ready once the receiver is installed."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGUSR1:
                print(render_task_tree(task_tree()), file=sys.stderr, flush=True)
            elif shutdown.is_set():
                logger.warning("second signal: stopping now")
                root.cancel()
            else:
                logger.info("shutting down", extra={"signal": signal.Signals(signum).name})
                shutdown.set()


async def run_agent(
    cfg: RegistryConfig,
    shutdown: trio.Event | None = None,
    hooks: Hooks | None = None,
    *,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[AgentHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run every service until `shutdown` is set (or a signal arrives); raise ServiceFailed on a
    service that keeps crashing."""
    from dht.node import Node, NodeConfig

    hooks = hooks or Hooks()
    shutdown = trio.Event() if shutdown is None else shutdown
    logger.info("configuration", extra={"config": dataclasses.asdict(cfg)})
    started_at = trio.current_time()
    node_id = load_or_create_node_id(cfg.data_dir)
    psk = read_cluster_key(cfg.cluster_key_file)
    trust = trust_summary(psk, cfg.cluster_key_file)
    if psk is None:
        logger.warning(trust["notice"], extra={"cluster_key": False, "tags_through_peers": False})
    node = Node(
        NodeConfig(
            node_id=node_id,
            bind_host=cfg.router_addr.bind_host,
            bind_port=cfg.router_addr.port,
            registry_port=cfg.registry_addr.port,
            psk=psk,
            standalone=cfg.standalone,
            more_hosts=more_addresses(cfg, detect_advertise_addr(cfg)),
        )
    )
    router = registry_router(node.router)
    supervisor = Supervisor(hooks.policy or RestartPolicy())
    readiness = Readiness(router, node.router.wait_ready)
    debug = DebugState(
        node_id=node_id.hex(),
        peers=node.contacts,
        services=lambda: dict(supervisor.states),
        ready=readiness,
        ready_detail=readiness.detail,
        trust=trust,
    )
    events = MirrorEvents()
    events.subscribe(debug.on_mirror_event)  # per-request results and last success for the page
    backend_factory = hooks.backend or containerd_backend
    unexport_dht_metrics = export_dht_metrics(node.statistics)  # spegla_dht_* on /metrics
    try:
        async with backend_factory(cfg, router) as backend, trio.open_nursery() as root:
            readiness.connected = backend.connected
            debug.images = backend.images
            debug.sections["dht"] = lambda: dataclasses.asdict(node.statistics())
            uploads = InflightUploads()  # the registry's (the app below counts them here)

            def containerd_state() -> dict[str, Any]:
                return {**backend.stats(), "inflight_uploads": uploads.snapshot()}

            debug.sections["containerd state"] = containerd_state
            if handle_signals:
                signals = functools.partial(_signals, shutdown, root.cancel_scope)
                await supervisor.start(root, "signals", signals)
            bound = await supervisor.start(root, "dht", node.serve)
            await supervisor.start(
                root, "debug-feed", functools.partial(watch_mirror_metrics, debug)
            )
            me = SelfInfo(node_id, detect_advertise_addr(cfg), int(bound[1]))
            claims = None
            if backend.claims is not None:
                addresses = (me.host, cfg.registry_addr.bind_host, *cfg.advertise_more_addrs)
                own = frozenset(h for h in addresses if h)
                connected = backend.connected
                claims = ClaimParticipation(
                    backend.claims, node_id, own_hosts=own, containerd_up=lambda: bool(connected)
                )
            parts = AppParts(backend.store, router, cfg, readiness, events, claims, psk, uploads)
            if hooks.app is None:
                from registry.serve.app import create_app

                # the registry's task tree (mirror fetches, shared fetches, claims' holds) is
                # the agent's, whichever server serves the app
                registry = default_registry(parts)
                await supervisor.start(root, "registry-tasks", registry.run)
                debug.sections["registry answers"] = lambda: dataclasses.asdict(registry.stats)
                app = create_app(registry)
            else:
                app = hooks.app(parts)
            server_stats = ServerStats()
            serve_registry = hooks.serve_registry or default_serve_with_stats(
                debug, server_stats, cfg
            )
            await supervisor.start(
                root,
                "memory-trim",
                functools.partial(
                    trim_when_idle, lambda: server_stats.requests, trim=glibc_malloc_trim()
                ),
            )
            grace = grace_seconds(cfg.shutdown_grace)
            metrics_app = create_metrics_app(debug, web_enabled=cfg.debug_web_enabled)
            with trio.CancelScope() as http_scope:
                async with trio.open_nursery() as http:
                    metrics_port = await supervisor.start(
                        http,
                        "metrics",
                        functools.partial(
                            serve_app,
                            metrics_app,
                            cfg.metrics_addr,
                            shutdown_trigger=shutdown.wait,
                            # its long-lived websockets must not hold the exit up
                            grace=min(grace, METRICS_GRACE),
                        ),
                    )
                    registry_port = await supervisor.start(
                        http,
                        "registry",
                        functools.partial(
                            serve_registry,
                            app,
                            cfg.registry_addr,
                            shutdown_trigger=shutdown.wait,
                            grace=grace,
                        ),
                    )
                    bootstrapper = hooks.bootstrapper or make_bootstrapper(cfg, me)
                    await supervisor.start(root, "bootstrap-source", bootstrapper.run)
                    await supervisor.start(
                        root,
                        "bootstrap",
                        functools.partial(
                            keep_joined, bootstrapper, node.bootstrap, router.ready, me
                        ),
                    )
                    # not awaited: the agent reports started before the first full advertise
                    supervisor.start_soon(
                        root, "state", functools.partial(_run_state, backend, readiness, started_at)
                    )
                    supervisor.start_soon(
                        root,
                        "ready-watch",
                        functools.partial(_announce_ready, readiness, started_at),
                    )
                    logger.info(
                        "agent started",
                        extra={
                            "node_id": node_id.hex(),
                            "registry_port": registry_port,
                            "router_port": me.port,
                            "metrics_port": metrics_port,
                            "advertise_addr": me.host,
                            "bootstrap": cfg.bootstrap.kind,
                        },
                    )
                    task_status.started(AgentHandle(node_id, registry_port, me.port, metrics_port))
                    await shutdown.wait()
                    readiness.stopping = True
                    # Servers stop accepting now; give in-flight requests the grace period.
                    http_scope.deadline = trio.current_time() + grace + 1.0
                    logger.info(
                        "draining running requests",
                        extra={"grace_s": cfg.shutdown_grace},  # null: as long as they take
                    )
            if http_scope.cancelled_caught:
                logger.warning("grace period over; cancelling remaining requests")
            root.cancel_scope.cancel()
    finally:
        unexport_dht_metrics()
    logger.info("exit gracefully")


async def _run_state(
    backend: Backend,
    readiness: Readiness,
    started_at: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The containerd state tracker; ready (and `readiness.advertised` set, for good) after its
    first full advertise."""
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run_tracker)
        if not readiness.advertised:
            readiness.advertised.set()
            logger.info(
                "containerd state advertised",
                extra={
                    "elapsed_s": round(trio.current_time() - started_at, 3),
                    **readiness.detail(),
                },
            )
        task_status.started()


async def _announce_ready(
    readiness: Readiness,
    started_at: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Log once when the agent first becomes ready, with the time it took; then done."""
    task_status.started()
    await readiness.wait()
    logger.info(
        "agent ready", extra={"start_to_ready_s": round(trio.current_time() - started_at, 3)}
    )


def main(cfg: RegistryConfig, hooks: Hooks | None = None) -> int:
    """Blocking entry for the CLI: 0 after a signal, 1 when a service keeps failing."""
    code = 0
    try:
        trio.run(functools.partial(run_agent, cfg, hooks=hooks))
    except* ServiceFailed as group:
        for exc in group.exceptions:
            logger.error("agent stopping: a service keeps failing", extra={"error": str(exc)})
        code = 1
    except* ConfigError as group:
        print(f"spegla registry: error: {group.exceptions[0]}", file=sys.stderr)
        code = 2
    return code
