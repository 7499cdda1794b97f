"""State tracker: keeps what this node advertises equal to what its containerd holds.

Why: peers find content through what each node advertises, so an advertised key whose content is
missing costs them a slow 404, and an unadvertised one costs an upstream download. The tracker lists
every image in the namespace, walks each one (`agent.containerd.image_walk` says which keys an image
gives), and advertises the union. Then it follows containerd's event stream (image
create/update/delete, content create on containerd >= 2.1, content delete) and re-walks on a timer.
Keys are reference-counted across images, so content shared by two images stays advertised when one
of them is deleted. When containerd restarts, the tracker resubscribes with backoff and resyncs; the
agent keeps running. It also keeps the `spegel_advertised_*` gauges.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable

import trio
from prometheus_client import Gauge

from agent.containerd.client import (
    ContainerdClient,
    ContainerdUnavailable,
    Envelope,
    ImageEvent,
    NotFound,
    decode_event,
    event_filters,
)
from agent.containerd.image_walk import (
    SOURCE_LABEL,
    AdvertisedImage,
    ChildrenCache,
    KeyCounts,
    LiveSource,
    SnapshotSource,
    gauge_values,
    image_keys,
    parse_record,
    source_registries,
)
from agent.flag import Flag
from registry.interfaces import Router
from registry.oci.filters import ReferenceFilter

logger = logging.getLogger(__name__)

# Prometheus metrics are process-wide by design (Spegel's names, registered once at import): the
# one kind of module-level state the agent keeps; the tracker writes them, /metrics reads them.
ADVERTISED_IMAGES = Gauge(
    "spegel_advertised_images", "Number of images advertised to be available.", ["registry"]
)
ADVERTISED_KEYS = Gauge(
    "spegel_advertised_keys", "Number of keys advertised to be available.", ["registry"]
)
ADVERTISED_IMAGE_TAGS = Gauge(
    "spegel_advertised_image_tags", "Number of image tags advertised to be available.", ["registry"]
)
ADVERTISED_IMAGE_DIGESTS = Gauge(
    "spegel_advertised_image_digests",
    "Number of image digests advertised to be available.",
    ["registry"],
)
ADVERTISED_CONTENT_DIGESTS = Gauge(
    "spegel_advertised_content_digests",
    "Number of content digests advertised to be available.",
    ["registry"],
)
_GAUGES = {
    "images": ADVERTISED_IMAGES,
    "keys": ADVERTISED_KEYS,
    "image_tags": ADVERTISED_IMAGE_TAGS,
    "image_digests": ADVERTISED_IMAGE_DIGESTS,
    "content_digests": ADVERTISED_CONTENT_DIGESTS,
}


# ---------------------------------------------------------------- the Trio driver


class StateTracker:
    """Advertises through `router` exactly what containerd holds; see the module docstring.

    ``await nursery.start(tracker.run)`` returns after the first full list + walk + advertise, then
    the tracker follows events and refreshes every `refresh_interval` seconds. If containerd is
    unreachable, `run` keeps retrying with exponential backoff (`start` waits until it succeeds;
    use `nursery.start_soon(tracker.run)` and `tracker.synced` to not wait).
    """

    def __init__(
        self,
        client: ContainerdClient,
        router: Router,
        *,
        filters: ReferenceFilter | None = None,
        refresh_interval: float = 300.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        operation_timeout: float = 120.0,
    ) -> None:
        if refresh_interval <= 0 or operation_timeout <= 0:
            raise ValueError("refresh_interval and operation_timeout must be positive")
        self._operation_timeout = operation_timeout
        self._client = client
        self._router = router
        self._filters = filters
        self._refresh_interval = refresh_interval
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._images: dict[str, AdvertisedImage] = {}
        self._loose: dict[str, frozenset[str]] = {}  # digest -> registries, from content events
        self._counts = KeyCounts()
        self._published: set[str] = set()  # what the router has been told, call by call
        self._cache = ChildrenCache()
        self.synced = trio.Event()  # set after the first full sync
        self._stats: Counter[str] = Counter()
        self._last_sync: float | None = None
        self._last_error = ""
        self.connected = Flag()  # subscribed to containerd's events (readiness awaits it)

    # -- reading the state (debug page, `spegla keys`)

    def keys(self) -> list[str]:
        """Every key currently advertised, sorted."""
        return sorted(self._counts.keys())

    def advertised_images(self) -> list[AdvertisedImage]:
        return sorted(self._images.values(), key=lambda i: i.name)

    def statistics(self) -> dict[str, object]:
        images = list(self._images.values())
        return {
            "connected": bool(self.connected),
            "synced": self.synced.is_set(),
            "images": len(images),
            "tags": sum(1 for i in images if i.tag_key is not None),
            "keys": len(self._counts.keys()),
            "loose_content": len(self._loose),
            "syncs": self._stats["syncs"],
            "events": self._stats["events"],
            "reconnects": self._stats["reconnects"],
            "last_sync_unix": self._last_sync,
            "last_error": self._last_error,
        }

    # -- the loop

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        backoff = self._backoff_initial
        status: trio.TaskStatus[None] | None = task_status
        while True:
            try:
                async with self._client.subscribe(event_filters(self._client.namespace)) as events:
                    self.connected.set(True)
                    backoff = self._backoff_initial
                    await self._session(events, status)
                    status = None
            except* ContainerdUnavailable as group:
                status = status if not self.synced.is_set() else None
                self.connected.set(False)
                self._stats["reconnects"] += 1
                self._last_error = str(group.exceptions[0])
                logger.warning(
                    "containerd unavailable, retrying",
                    extra={"error": self._last_error, "retry_in": backoff},
                )
            await trio.sleep(backoff)
            backoff = min(backoff * 2, self._backoff_max)

    async def _session(
        self, events: AsyncIterator[Envelope], status: trio.TaskStatus[None] | None
    ) -> None:
        send, recv = trio.open_memory_channel[Envelope](10_000)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, events, send)  # buffer events that arrive during sync
            await self._bounded(self.sync())
            if status is not None:
                status.started()
            async with recv:
                next_refresh = trio.current_time() + self._refresh_interval
                while True:
                    env: Envelope | None = None
                    with trio.move_on_at(next_refresh):
                        env = await recv.receive()
                    if env is None:
                        await self._bounded(self.sync())
                        next_refresh = trio.current_time() + self._refresh_interval
                    else:
                        await self._bounded(self.handle(env))

    async def _bounded(self, operation: Awaitable[None]) -> None:
        """A containerd that accepts calls but never answers counts as unavailable."""
        with trio.move_on_after(self._operation_timeout) as scope:
            await operation
        if scope.cancelled_caught:
            raise ContainerdUnavailable(
                f"containerd did not answer within {self._operation_timeout} s"
            )

    async def _pump(
        self, events: AsyncIterator[Envelope], send: trio.MemorySendChannel[Envelope]
    ) -> None:
        async with send:
            async for env in events:
                await send.send(env)
        raise ContainerdUnavailable("event stream ended")  # pragma: no cover - _envelopes raises

    async def sync(self) -> None:
        """List and walk every image; advertise what is new, withdraw what is gone."""
        client = self._client
        present = {info.digest for info in await client.list_content()}
        source = SnapshotSource(client, present)
        images: dict[str, AdvertisedImage] = {}
        for image in await client.list_images(['name~="^.+/"']):
            ref = parse_record(image, self._filters)
            if ref is not None:
                images[image.name] = await image_keys(source, image, ref, self._cache)
        covered = set().union(*(i.digests for i in images.values()))
        loose = {d: r for d, r in self._loose.items() if d in present and d not in covered}
        counts = KeyCounts()
        for img in images.values():
            counts.change((), img.keys)
        for digest in loose:
            counts.change((), {digest})
        new_keys = counts.keys()
        self._images, self._loose, self._counts = images, loose, counts
        self._stats["syncs"] += 1
        self._last_sync = time.time()
        # Diff against what the router was actually told, so a router call that failed or was
        # cancelled earlier is made good here.
        await self._publish(set(new_keys - self._published), self._published - new_keys)
        self.synced.set()
        logger.info("containerd state synced", extra={"images": len(images), "keys": len(new_keys)})

    async def handle(self, env: Envelope) -> None:
        """Apply one containerd event."""
        event = decode_event(env)
        if event is None:
            return
        self._stats["events"] += 1
        logger.debug("containerd event", extra={"topic": env.topic, "event": str(event)})
        if isinstance(event, ImageEvent):
            if event.action == "delete":
                await self._set_image(event.name, None)
            else:
                await self._set_image(event.name, await self._walk_image(event.name))
        elif event.action == "create":
            await self._content_created(event.digest)
        else:
            await self._content_deleted(event.digest)

    async def _walk_image(self, name: str) -> AdvertisedImage | None:
        if "/" not in name:
            return None
        try:
            image = await self._client.get_image(name)
        except NotFound:
            return None
        ref = parse_record(image, self._filters)
        if ref is None:
            return None
        return await image_keys(LiveSource(self._client), image, ref, self._cache)

    async def _set_image(self, name: str, new: AdvertisedImage | None) -> None:
        old = self._images.pop(name, None)
        if new is not None:
            self._images[name] = new
        added, removed = self._counts.change(old.keys if old else (), new.keys if new else ())
        if new is not None:  # content announced early by content events now belongs to an image
            for digest in new.digests & self._loose.keys():
                del self._loose[digest]
                a, r = self._counts.change({digest}, ())
                added |= a
                removed |= r
        await self._publish(added, removed)

    async def _content_created(self, digest: str) -> None:
        """containerd >= 2.1: advertise a blob as soon as it is committed, once labelled."""
        if digest in self._counts:
            return
        delay = 0.01
        for _ in range(10):  # the distribution-source label is written just after the commit
            try:
                info = await self._client.content_info(digest)
            except NotFound:
                return
            if any(k.startswith(SOURCE_LABEL) for k in info.labels):
                registries = source_registries(info.labels, digest, self._filters)
                if registries and digest not in self._counts:
                    self._loose[digest] = registries
                    added, removed = self._counts.change((), {digest})
                    await self._publish(added, removed)
                return
            await trio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def _content_deleted(self, digest: str) -> None:
        if digest in self._loose:
            del self._loose[digest]
            await self._publish(*self._counts.change({digest}, ()))
        for name in [n for n, img in self._images.items() if digest in img.digests]:
            await self._set_image(name, await self._walk_image(name))

    async def _publish(self, added: set[str], removed: set[str]) -> None:
        if added:
            await self._router.advertise(sorted(added))
            self._published |= added
        if removed:
            await self._router.withdraw(sorted(removed))
            self._published -= removed
        if added or removed:
            logger.info(
                "advertised keys changed", extra={"added": len(added), "withdrawn": len(removed)}
            )
        self._update_gauges()

    def _update_gauges(self) -> None:
        values = gauge_values(self._images.values(), self._loose)
        for kind, gauge in _GAUGES.items():
            gauge.clear()
            for registry, counts in values.items():
                gauge.labels(registry=registry).set(counts[kind])
