"""The registry's HTTP answers: response shapes, error bodies, and the planned blob responses.

Why its own module: the app (`registry.serve.app`) decides what to answer; how an answer looks on
the
wire (empty bodies without a Content-Type, OCI error JSON, local blob heads and ranges, a mirrored
body cut short by `MirrorAborted`) and the plans the zero-copy front door executes (`LocalBlob`,
`MirrorPlan`) are shared with `registry.serve.front_door`, `registry.serve.mirror_door` and the
servers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio
from quart_trio import QuartTrio
from quart_trio.wrappers import TrioResponse

from registry.interfaces import ContentNotFound, ContentStore, Descriptor, IngestFile
from registry.mirror.buffers import Chunk
from registry.mirror.forwarder import Forwarder
from registry.mirror.job import MirrorAbort, MirrorItem, MirrorJob
from registry.oci.distribution import ErrorCode, error_body
from registry.oci.mediatypes import OCTET_STREAM
from registry.oci.ranges import RangeNotSatisfiable, RangeSpec

if TYPE_CHECKING:
    from registry.serve.app import _Registry

__all__ = [
    "LocalBlob",
    "MirrorAborted",
    "MirrorPlan",
    "Response",
    "blob_response",
    "blob_response_parts",
    "empty_response",
    "mirror_chunks",
    "oci_error",
]


class Response(TrioResponse):
    """Responses carry no Content-Type unless one is set (Spegel's empty-bodied answers)."""

    default_mimetype = None  # type: ignore[assignment]


class MirrorAborted(Exception):
    """Raised inside a response body to cut it short (peer content failed or ran out)."""


def empty_response(status: int, headers: dict[str, str] | None = None) -> Response:
    response = Response(b"", status=status, headers=headers or {})
    response.headers["Content-Length"] = "0"
    return response


def oci_error(
    status: int,
    code: ErrorCode,
    message: str,
    detail: object = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = error_body(code, message, detail)
    response = Response(body, status=status, headers=headers or {})
    response.headers["Content-Type"] = "application/json"
    response.headers["Content-Length"] = str(len(body))
    return response


async def mirror_chunks(
    receive: trio.MemoryReceiveChannel[MirrorItem],
) -> AsyncIterator[bytes | bytearray | memoryview]:
    with receive:
        async for item in receive:
            if isinstance(item, Chunk):
                # Hypercorn copies the body it is given before this generator resumes
                with item.view() as view:
                    yield view
                item.release()
            elif isinstance(item, bytes | bytearray):
                if item:
                    yield item
            elif isinstance(item, MirrorAbort):
                raise MirrorAborted(item.reason)


def blob_response_parts(
    descriptor: Descriptor, registry: str, range_spec: RangeSpec | None
) -> tuple[int, dict[str, str], int, int]:
    """Status, headers, first byte and length of a local blob response (RangeNotSatisfiable)."""
    headers = {
        "Docker-Content-Digest": descriptor.digest,
        "OCI-Namespace": registry,
        "Accept-Ranges": "bytes",
    }
    if range_spec is None:
        headers["Content-Type"] = descriptor.media_type
        headers["Content-Length"] = str(descriptor.size)
        return 200, headers, 0, descriptor.size
    selected = range_spec.resolve(descriptor.size)
    headers["Content-Type"] = OCTET_STREAM
    headers["Content-Range"] = selected.content_range
    headers["Content-Length"] = str(selected.length)
    return 206, headers, selected.start, selected.length


def blob_response(
    descriptor: Descriptor,
    registry: str,
    method: str,
    range_spec: RangeSpec | None,
    body: Callable[[int, int], AsyncIterator[bytes] | Response],
) -> Response:
    """A blob's answer: 416 for a range outside it; for a GET of some bytes, what `body(start,
    length)` gives (the bytes, or an error response instead); Content-Length of the selection."""
    size = descriptor.size
    try:
        status, headers, start, length = blob_response_parts(descriptor, registry, range_spec)
    except RangeNotSatisfiable:
        return oci_error(
            416,
            ErrorCode.RANGE_INVALID,
            f"range not satisfiable for {size} bytes",
            headers={"Content-Range": f"bytes */{size}"},
        )
    del headers["Content-Length"]
    if method == "HEAD" or length == 0:
        response = Response(b"", status=status, headers=headers)
    else:
        chunks = body(start, length)
        if isinstance(chunks, Response):
            return chunks
        response = Response(chunks, status=status, headers=headers)
    response.headers["Content-Length"] = str(length)
    return response


@dataclass(frozen=True, slots=True)
class LocalBlob:
    """A planned response for a local blob backed by a file (used by the zero-copy path)."""

    status: int
    headers: dict[str, str]  # lower-case names, Content-Length included
    offset: int
    length: int
    store: ContentStore
    descriptor: Descriptor
    ingest: IngestFile | None = None  # still downloading: serve with `registry.serve.inflight`

    @asynccontextmanager
    async def open(self) -> AsyncIterator[str]:
        """Hold the content open; yields the file to read from."""
        async with self.store.open(self.descriptor.digest) as reader:
            if reader.path is None or reader.size != self.descriptor.size:
                raise ContentNotFound(self.descriptor.digest)
            yield reader.path


@dataclass(frozen=True, slots=True)
class MirrorPlan:
    """A blob GET to be answered from peers (the front door writes it; see
    registry.serve.mirror_door)."""

    job: MirrorJob
    forwarder: Forwarder
    app: QuartTrio

    def open(self, nursery: trio.Nursery) -> trio.MemoryReceiveChannel[MirrorItem]:
        """Start the forwarder in `nursery`; its items arrive on the returned channel."""
        registry: _Registry = self.app.extensions["spegla.registry"]
        return registry.open_mirror(self.job, nursery)
