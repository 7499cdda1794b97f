"""A synchronous CRI ImageService client, so tests pull images exactly the way kubelet does.

Why: containerd's CRI plugin is the path that reads ``config_path`` (hosts.toml) and asks the node's
mirror; ``ctr`` does not.  There is no crictl on Debian 12, so the harness has its own client on the
project's minimal proto subset (``tests/harness/proto/cri_images.proto``).

asyncio is confined to this module on purpose: grpclib speaks asyncio, while the harness is plain
synchronous test tooling (pytest fixtures, ``hack/cluster``).  Each call runs its own short
``asyncio.run`` with a fresh channel, so no event loop outlives a call and nothing leaks into Trio
tests that use the harness.  Because containerd does the fetches itself, a pull against a
containerd that runs inside a node namespace happens inside that namespace; only the unix socket is
used from here.

API
- ``CriClient(socket_path)``: ``.pull(image, timeout=120.0)`` -> image ref (config digest),
  ``.status(image)`` -> ``CriImage | None``, ``.remove(image)``, ``.list()`` -> list[``CriImage``].
- ``CriError`` (carries the gRPC status name and message) for failed calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from grpclib.client import Channel
from grpclib.exceptions import GRPCError

from .proto import cri_images_grpc as grpc_stubs
from .proto import cri_images_pb2 as pb

T = TypeVar("T")


class CriError(RuntimeError):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class CriImage:
    id: str
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]
    size: int


def _image(img: Any) -> CriImage:
    return CriImage(img.id, tuple(img.repo_tags), tuple(img.repo_digests), int(img.size))


class CriClient:
    def __init__(self, socket_path: Path | str) -> None:
        self.socket_path = str(socket_path)

    def _call(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        async def run() -> T:
            channel = Channel(path=self.socket_path)
            try:
                return await fn(grpc_stubs.ImageServiceStub(channel))
            except GRPCError as e:
                raise CriError(e.status.name, e.message or "") from None
            finally:
                channel.close()

        return asyncio.run(run())

    def pull(self, image: str, timeout: float = 120.0) -> str:
        req = pb.PullImageRequest(image=pb.ImageSpec(image=image))

        async def call(stub: Any) -> str:
            resp = await stub.PullImage(req, timeout=timeout)
            return str(resp.image_ref)

        return self._call(call)

    def status(self, image: str) -> CriImage | None:
        req = pb.ImageStatusRequest(image=pb.ImageSpec(image=image))

        async def call(stub: Any) -> CriImage | None:
            resp = await stub.ImageStatus(req, timeout=30)
            return _image(resp.image) if resp.HasField("image") else None

        return self._call(call)

    def remove(self, image: str) -> None:
        req = pb.RemoveImageRequest(image=pb.ImageSpec(image=image))

        async def call(stub: Any) -> None:
            await stub.RemoveImage(req, timeout=30)

        self._call(call)

    def list(self) -> list[CriImage]:
        async def call(stub: Any) -> list[CriImage]:
            resp = await stub.ListImages(pb.ListImagesRequest(), timeout=30)
            return [_image(i) for i in resp.images]

        return self._call(call)
