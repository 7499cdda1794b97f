"""The parts the agent is built from, and how production builds them.

Why its own module: `agent.runtime.run` wires services together and does not care whether the
containerd side, the registry and its server are the real ones or in-memory doubles; the typed
factories here (`BackendFactory`, `AppFactory`, `ServeRegistry`) are what tests replace, and the
functions below them are the production defaults.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import trio
from quart_trio import QuartTrio

from agent.config import ListenAddr, RegistryConfig
from agent.flag import Flag
from agent.node.setup import detect_advertise_addr, read_basic_auth
from agent.observability.debug import DebugState
from agent.runtime.supervise import Service
from registry.burst.claim_supply import ClaimParticipation
from registry.events import MirrorEvents
from registry.http.server import ConnectionLimits, ServerStats
from registry.interfaces import ClaimBoard, ContentStore, Router
from registry.serve.inflight import InflightUploads

if TYPE_CHECKING:
    from registry.serve.app import Registry

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Backend:
    """What the containerd side gives the agent."""

    store: ContentStore
    run_tracker: Service  # started() after the first full advertise
    connected: Flag = field(default_factory=lambda: Flag(True))  # containerd reachable
    images: Callable[[], list[Any]] = list  # names or dicts (AdvertisedImage.as_dict)
    stats: Callable[[], dict[str, Any]] = dict
    claims: ClaimBoard | None = None  # where burst claims go (None: no claims)


BackendFactory = Callable[[RegistryConfig, Router], AbstractAsyncContextManager[Backend]]


class ServeRegistry(Protocol):
    """Serves the registry app on `addr` until `shutdown_trigger` returns; reports the port."""

    async def __call__(
        self,
        app: QuartTrio,
        addr: ListenAddr,
        *,
        shutdown_trigger: Callable[[], Awaitable[None]],
        grace: float,
        task_status: trio.TaskStatus[int] = ...,
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class AppParts:
    """What the registry app is built from."""

    store: ContentStore
    router: Router
    cfg: RegistryConfig
    ready: Callable[[], bool]
    events: MirrorEvents  # the mirror path reports here (the debug page subscribes)
    claims: ClaimParticipation | None = None  # take part in bursts' claims
    cluster_key: bytes | None = None  # None: no key, so no tags through peers
    # the registry's uploads of blobs still downloading here (the debug page lists them)
    uploads: InflightUploads = field(default_factory=InflightUploads)


AppFactory = Callable[[AppParts], QuartTrio]


@asynccontextmanager
async def containerd_backend(cfg: RegistryConfig, router: Router) -> AsyncIterator[Backend]:
    from agent.advertising.advertiser import KeyAdvertiser
    from agent.advertising.state import StateTracker
    from agent.containerd.client import open_containerd
    from agent.containerd.content_store import ContainerdContentStore
    from agent.containerd.ingest import IngestWatcher
    from registry.oci.filters import ReferenceFilter

    filters = ReferenceFilter.from_config(cfg.mirrored_registries, cfg.registry_filters)
    async with open_containerd(
        cfg.containerd_sock, cfg.containerd_namespace, check=False
    ) as client:
        store = ContainerdContentStore(client, cfg.containerd_content_path)
        # one voice towards the router: the tracker's complete keys, downloads in progress
        advertiser = KeyAdvertiser(router)
        tracker = StateTracker(
            client,
            advertiser.tracker_router(),
            filters=filters,
            refresh_interval=cfg.state_refresh,
        )
        # a fresh node's containerd creates its content directory with its first pull: the
        # watcher looks for it at once each time (cheap), not at the store's slower pace
        watcher = IngestWatcher(
            functools.partial(store.content_dir, look_now=True),
            cfg.containerd_namespace,
            advertiser.on_ingest,
        )
        store.ingests = watcher

        def inflight_stats() -> dict[str, Any]:
            downloads = [
                {"key": e.digest, "total": e.total, "ref": e.ref} for e in watcher.table.entries()
            ]
            return {"inflight_downloads": downloads}

        async def run_state(
            *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        ) -> None:
            async with trio.open_nursery() as nursery:
                await nursery.start(advertiser.run)
                await nursery.start(watcher.run)
                await nursery.start(tracker.run)
                task_status.started()

        yield Backend(
            store=store,
            run_tracker=run_state,
            connected=tracker.connected,
            images=lambda: [image.as_dict() for image in tracker.advertised_images()],
            stats=lambda: {**tracker.statistics(), **inflight_stats()},
            claims=advertiser,
        )


def default_registry(parts: AppParts) -> Registry:
    """The registry (its parts and task tree) the default app is built on."""
    from registry.auth.peer import PeerAuth
    from registry.oci.filters import ReferenceFilter
    from registry.serve.app import Registry, RegistrySettings

    cfg = parts.cfg
    # loopback peers only when this agent is itself on loopback: then every agent is on this host
    mirror = dataclasses.replace(
        cfg.mirror_settings(), allow_loopback_peers=_is_loopback(detect_advertise_addr(cfg))
    )
    settings = RegistrySettings(
        mirror=mirror,
        filters=ReferenceFilter.from_config(cfg.mirrored_registries, cfg.registry_filters),
        readiness=parts.ready,
        basic_auth=read_basic_auth(cfg.basic_auth_dir),
        peer_upload_limit=cfg.peer_upload_limit,
        peer_auth=None if parts.cluster_key is None else PeerAuth(parts.cluster_key),
        trusted_proxies=cfg.trusted_proxies,
    )
    if settings.basic_auth is not None:
        logger.info("basic auth enabled", extra={"basic_auth_dir": cfg.basic_auth_dir})
    return Registry(
        parts.store,
        parts.router,
        settings,
        events=parts.events,
        claims=parts.claims,
        uploads=parts.uploads,
    )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def default_serve_registry(
    app: QuartTrio,
    addr: ListenAddr,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    grace: float,
    stats: ServerStats | None = None,
    limits: ConnectionLimits | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    from registry.serve.server import serve_registry

    await serve_registry(
        app,
        addr.bind_host,
        addr.port,
        shutdown_trigger=shutdown_trigger,
        graceful_timeout=grace,
        stats=stats,
        limits=limits,
        task_status=task_status,
    )


def default_serve_with_stats(
    debug: DebugState, stats: ServerStats, cfg: RegistryConfig
) -> ServeRegistry:
    """The registry's own server, with its counters on the debug page."""
    debug.sections["registry server"] = lambda: dict(vars(stats))
    limits = ConnectionLimits(cfg.max_connections, cfg.send_timeout)
    return functools.partial(default_serve_registry, stats=stats, limits=limits)
