"""Small fakes for unit tests of the containerd-side pure logic (walks, events, key accounting)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager

import trio

from agent.containerd.client import (
    ContainerdUnavailable,
    ContentInfo,
    Descriptor,
    Envelope,
    Image,
    NotFound,
)
from registry.oci.mediatypes import OCI_CONFIG, OCI_INDEX, OCI_MANIFEST
from registry.oci.reference import sha256_digest

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


class RecordingRouter:
    """A Router that records every advertise/withdraw call and the resulting key set."""

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    def ready(self) -> bool:
        return True

    async def advertise(self, keys: Iterable[str]) -> None:
        batch = tuple(keys)
        self.calls.append(("advertise", batch))
        self.keys.update(batch)
        await trio.lowlevel.checkpoint()

    async def withdraw(self, keys: Iterable[str]) -> None:
        batch = tuple(keys)
        self.calls.append(("withdraw", batch))
        self.keys.difference_update(batch)
        await trio.lowlevel.checkpoint()

    def resolve(self, key: str) -> object:
        raise NotImplementedError


class FakeContent:
    """A content store in memory that doubles as a `ContentSource` and as a minimal client."""

    namespace = "k8s.io"

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.labels: dict[str, dict[str, str]] = {}
        self.images: dict[str, Image] = {}
        self.info_calls = 0
        self.hang_listing = False  # list_images never answers (a wedged containerd)
        self.down = False  # subscribe fails as if the socket were gone
        self.events: trio.MemoryReceiveChannel[Envelope] | None = None

    def add(self, data: bytes, labels: Mapping[str, str] | None = None) -> str:
        d = sha256_digest(data)
        self.blobs[d] = data
        self.labels[d] = dict(labels or {})
        return d

    def add_image(
        self, data: bytes, media_type: str, *, layers: int = 2, seed: str = ""
    ) -> Descriptor:
        """Store an image manifest (config + layers) built from `data`; returns its descriptor."""
        config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"seed": seed}})
        cfg = self.add(config.encode())
        layer_descs = []
        for i in range(layers):
            blob = f"{seed}-layer-{i}-{data!r}".encode()
            layer_descs.append({"mediaType": LAYER, "digest": self.add(blob), "size": len(blob)})
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": media_type,
            "config": {"mediaType": OCI_CONFIG, "digest": cfg, "size": len(config)},
            "layers": layer_descs,
        }).encode()  # fmt: skip
        return Descriptor(self.add(manifest), len(manifest), media_type)

    def add_index(self, manifests: list[Descriptor]) -> Descriptor:
        body = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": m.media_type, "digest": m.digest, "size": m.size}
                          for m in manifests],
        }).encode()  # fmt: skip
        return Descriptor(self.add(body), len(body), OCI_INDEX)

    def tag(self, name: str, target: Descriptor) -> Image:
        image = Image(name, target)
        self.images[name] = image
        return image

    # ContentSource
    async def present(self, digest: str) -> bool:
        await trio.lowlevel.checkpoint()
        return digest in self.blobs

    async def read(self, digest: str, limit: int) -> bytes:
        await trio.lowlevel.checkpoint()
        if digest not in self.blobs:
            raise NotFound(digest)
        return self.blobs[digest]

    # the ContainerdClient methods the tracker uses
    async def content_info(self, digest: str) -> ContentInfo:
        self.info_calls += 1
        await trio.lowlevel.checkpoint()
        if digest not in self.blobs:
            raise NotFound(digest)
        return ContentInfo(digest, len(self.blobs[digest]), dict(self.labels[digest]))

    async def list_content(self, filters: Iterable[str] = ()) -> list[ContentInfo]:
        return [await self.content_info(d) for d in list(self.blobs)]

    async def list_images(self, filters: Iterable[str] = ()) -> list[Image]:
        await trio.lowlevel.checkpoint()
        if self.hang_listing:
            await trio.sleep_forever()
        return list(self.images.values())

    async def get_image(self, name: str) -> Image:
        await trio.lowlevel.checkpoint()
        if name not in self.images:
            raise NotFound(name)
        return self.images[name]

    @asynccontextmanager
    async def subscribe(
        self, filters: Iterable[str] = ()
    ) -> AsyncIterator[AsyncIterator[Envelope]]:
        await trio.lowlevel.checkpoint()
        if self.down:
            raise ContainerdUnavailable("fake containerd is down")

        async def envelopes() -> AsyncIterator[Envelope]:
            if self.events is None:
                await trio.sleep_forever()
            else:
                async for env in self.events:
                    yield env
            raise ContainerdUnavailable("fake event stream ended")

        yield envelopes()

    async def read_blob(self, digest: str, limit: int) -> bytes:
        return await self.read(digest, limit)


__all__ = ["OCI_MANIFEST", "FakeContent", "RecordingRouter", "sha256_digest"]
