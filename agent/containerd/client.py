"""A Trio-native containerd client: the few gRPC calls spegla needs, as plain async methods.

Why: the agent serves and advertises only what its node's containerd holds, so it asks
containerd (images, content, events) over the unix socket. grpclib does the gRPC work behind
`agent.containerd.grpc_bridge`; this module turns protobuf messages into frozen records, adds the
`containerd-namespace` metadata to every namespaced call, and turns failures into three errors
callers can act on: `ContainerdUnavailable` (socket missing, containerd down or restarting),
`NotFound` (no such image or content in the namespace) and `ContainerdError` (anything else).
Every call is cancellable by the caller's Trio cancel scopes; nothing here takes a `timeout=`.
Event envelopes are decoded here too (`decode_event`), into `ImageEvent` / `ContentEvent`.

Usage::

    async with open_containerd("/run/containerd/containerd.sock", "k8s.io") as client:
        image = await client.get_image("docker.io/library/nginx:1.25")
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Literal

import h2.exceptions
import trio
from google.protobuf import empty_pb2
from google.protobuf.message import DecodeError
from grpclib.const import Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from agent.containerd.grpc_bridge import GrpcChannel, open_grpc_channel
from agent.proto import (
    containerd_content_events_pb2,
    containerd_content_grpc,
    containerd_content_pb2,
    containerd_events_grpc,
    containerd_events_pb2,
    containerd_images_grpc,
    containerd_images_pb2,
    containerd_introspection_grpc,
    containerd_introspection_pb2,
    containerd_version_grpc,
)
from registry.interfaces import Descriptor
from registry.oci.reference import is_digest

logger = logging.getLogger(__name__)

NAMESPACE_METADATA = "containerd-namespace"
CONTENT_PLUGIN_TYPE = "io.containerd.content.v1"
# containerd's rule for namespace names: labels of [A-Za-z0-9] joined by one of . _ -
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$")
_NAMESPACE_MAX = 76
# What a dropped or refused connection looks like from grpclib.
_TRANSPORT_ERRORS = (OSError, EOFError, StreamTerminatedError, ProtocolError, h2.exceptions.H2Error)


class ContainerdError(Exception):
    """containerd answered with an error spegla has no special handling for."""


class ContainerdUnavailable(ContainerdError):
    """containerd cannot be reached: socket missing, nobody listening, or the connection dropped."""


class NotFound(ContainerdError, LookupError):
    """The image or content does not exist in the configured namespace."""


@dataclass(frozen=True, slots=True)
class Image:
    """An image record: a name (`registry/repo:tag`, `registry/repo@sha256:...` or an image id)."""

    name: str
    target: Descriptor
    labels: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True, slots=True)
class ContentInfo:
    """A committed blob in the namespace: digest, size, labels (containerd keeps no media type)."""

    digest: str
    size: int
    labels: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True, slots=True)
class IngestStatus:
    """A write in progress (an ingest): how far it got and what it is expected to become."""

    ref: str
    offset: int
    total: int
    expected: str


@dataclass(frozen=True, slots=True)
class Envelope:
    """One event from the subscription; `payload` is the serialized message named by `type_url`."""

    namespace: str
    topic: str
    type_url: str
    payload: bytes
    timestamp: float  # unix seconds


@dataclass(frozen=True, slots=True)
class Version:
    version: str
    revision: str


def validate_namespace(namespace: str) -> str:
    if len(namespace) > _NAMESPACE_MAX or not _NAMESPACE_RE.match(namespace):
        raise ValueError(f"invalid containerd namespace {namespace!r}")
    return namespace


class ContainerdClient:
    """Trio-native calls into one containerd, scoped to one namespace (see `open_containerd`)."""

    def __init__(self, channel: GrpcChannel, socket_path: str, namespace: str) -> None:
        self._channel = channel
        self.socket_path = socket_path
        self.namespace = validate_namespace(namespace)
        self._md = {NAMESPACE_METADATA: namespace}
        ch = channel.channel
        self._version = containerd_version_grpc.VersionStub(ch)
        self._images = containerd_images_grpc.ImagesStub(ch)
        self._content = containerd_content_grpc.ContentStub(ch)
        self._events = containerd_events_grpc.EventsStub(ch)
        self._introspection = containerd_introspection_grpc.IntrospectionStub(ch)

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except GRPCError as exc:
            message = f"{what}: {exc.message or exc.status.name}"
            if exc.status is Status.NOT_FOUND:
                raise NotFound(message) from exc
            if exc.status is Status.UNAVAILABLE:
                raise ContainerdUnavailable(f"containerd at {self.socket_path}: {message}") from exc
            raise ContainerdError(f"{message} ({exc.status.name})") from exc
        except _TRANSPORT_ERRORS as exc:
            reason = str(exc) or type(exc).__name__
            raise ContainerdUnavailable(
                f"containerd at {self.socket_path} is unreachable ({what}): {reason}"
            ) from exc

    async def version(self) -> Version:
        """containerd's version (needs no namespace); also the liveness probe."""
        with self._errors("version"):
            reply = await self._channel.unary(self._version.Version, empty_pb2.Empty())
        return Version(reply.version, reply.revision)

    async def get_image(self, name: str) -> Image:
        """The image record named exactly `name`; NotFound if absent."""
        with self._errors(f"get image {name}"):
            reply = await self._channel.unary(
                self._images.Get, containerd_images_pb2.GetImageRequest(name=name), self._md
            )
        return _image(reply.image)

    async def list_images(self, filters: Sequence[str] = ()) -> list[Image]:
        """Image records matching any of the containerd filter expressions (all when empty)."""
        request = containerd_images_pb2.ListImagesRequest(filters=list(filters))
        with self._errors("list images"):
            reply = await self._channel.unary(self._images.List, request, self._md)
        return [_image(i) for i in reply.images]

    async def content_info(self, digest: str) -> ContentInfo:
        """Size and labels of a committed blob; NotFound if it is not in the namespace."""
        with self._errors(f"content info {digest}"):
            reply = await self._channel.unary(
                self._content.Info, containerd_content_pb2.InfoRequest(digest=digest), self._md
            )
        return _info(reply.info)

    async def list_content(self, filters: Sequence[str] = ()) -> list[ContentInfo]:
        """Every committed blob in the namespace (matching any filter, all when empty)."""
        request = containerd_content_pb2.ListContentRequest(filters=list(filters))
        out: list[ContentInfo] = []
        with self._errors("list content"):
            call = self._channel.server_stream(self._content.List, request, self._md)
            async with call as replies:
                async for reply in replies:
                    out.extend(_info(i) for i in reply.info)
        return out

    @asynccontextmanager
    async def read_content(
        self, digest: str, offset: int = 0, size: int = 0
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """Stream `size` bytes (0 = to the end) of a blob from `offset`, in containerd's chunks.

        ``async with client.read_content(d, 0, n) as chunks: async for chunk in chunks: ...``
        NotFound (raised while iterating) if the blob is absent.
        """
        if offset < 0 or size < 0:
            raise ValueError("offset and size must not be negative")
        request = containerd_content_pb2.ReadContentRequest(digest=digest, offset=offset, size=size)
        with self._errors(f"read content {digest}"):
            call = self._channel.server_stream(self._content.Read, request, self._md)
            async with call as replies:
                yield self._chunks(replies, digest)

    async def _chunks(self, replies: AsyncIterator[object], digest: str) -> AsyncIterator[bytes]:
        with self._errors(f"read content {digest}"):
            async for reply in replies:
                data: bytes = reply.data  # type: ignore[attr-defined]
                if data:
                    yield data

    async def read_blob(self, digest: str, limit: int) -> bytes:
        """A whole (small) blob in memory; ValueError if it is larger than `limit` bytes."""
        buf = bytearray()
        async with self.read_content(digest) as chunks:
            async for chunk in chunks:
                buf += chunk
                if len(buf) > limit:
                    raise ValueError(f"{digest} is larger than {limit} bytes")
        return bytes(buf)

    async def list_statuses(self, filters: Sequence[str] = ()) -> list[IngestStatus]:
        """Writes in progress in the namespace (downloads containerd has not committed yet)."""
        request = containerd_content_pb2.ListStatusesRequest(filters=list(filters))
        with self._errors("list ingests"):
            reply = await self._channel.unary(self._content.ListStatuses, request, self._md)
        return [IngestStatus(s.ref, s.offset, s.total, s.expected) for s in reply.statuses]

    async def abort_ingest(self, ref: str) -> None:
        """Drop a write in progress (its partial data is deleted); NotFound if there is none."""
        request = containerd_content_pb2.AbortRequest(ref=ref)
        with self._errors("abort ingest"):
            await self._channel.unary(self._content.Abort, request, self._md)

    async def content_root(self) -> str | None:
        """The content store's directory as containerd reports it (introspection), if it does."""
        request = containerd_introspection_pb2.PluginsRequest(
            filters=[f'type=="{CONTENT_PLUGIN_TYPE}"']
        )
        with self._errors("introspection"):
            reply = await self._channel.unary(self._introspection.Plugins, request)
        for plugin in reply.plugins:
            root = plugin.exports.get("root")
            if plugin.type == CONTENT_PLUGIN_TYPE and root:
                return str(root)
        return None

    @asynccontextmanager
    async def subscribe(
        self, filters: Sequence[str] = ()
    ) -> AsyncIterator[AsyncIterator[Envelope]]:
        """Follow containerd's event stream (all namespaces unless a filter says otherwise).

        ``async with client.subscribe([...]) as events: async for envelope in events: ...``
        The iteration raises ContainerdUnavailable when containerd goes away.
        """
        request = containerd_events_pb2.SubscribeRequest(filters=list(filters))
        with self._errors("subscribe"):
            async with self._channel.server_stream(self._events.Subscribe, request) as replies:
                yield self._envelopes(replies)

    async def _envelopes(self, replies: AsyncIterator[object]) -> AsyncIterator[Envelope]:
        with self._errors("event stream"):
            async for env in replies:
                yield Envelope(
                    namespace=env.namespace,  # type: ignore[attr-defined]
                    topic=env.topic,  # type: ignore[attr-defined]
                    type_url=env.event.type_url,  # type: ignore[attr-defined]
                    payload=env.event.value,  # type: ignore[attr-defined]
                    timestamp=env.timestamp.seconds + env.timestamp.nanos / 1e9,  # type: ignore[attr-defined]
                )
        raise ContainerdUnavailable(f"containerd at {self.socket_path} ended the event stream")


# Events, decoded (pure).


@dataclass(frozen=True, slots=True)
class ImageEvent:
    """An image record was created, updated or deleted (events carry the name, never a digest)."""

    action: Literal["create", "update", "delete"]
    name: str


@dataclass(frozen=True, slots=True)
class ContentEvent:
    """A blob was committed (containerd >= 2.1) or deleted through the API (not by GC)."""

    action: Literal["create", "delete"]
    digest: str


_IMAGE_TOPICS: dict[str, Literal["create", "update", "delete"]] = {
    "/images/create": "create",
    "/images/update": "update",
    "/images/delete": "delete",
}
_CONTENT_TOPICS: dict[str, Literal["create", "delete"]] = {
    "/content/create": "create",
    "/content/delete": "delete",
}


def event_filters(namespace: str) -> list[str]:
    """Subscription filters: image and content events of our namespace only."""
    return [
        f'topic~="^/images/",namespace=="{namespace}"',
        f'topic~="^/content/",namespace=="{namespace}"',
    ]


def decode_event(env: Envelope) -> ImageEvent | ContentEvent | None:
    """Decode by topic, the same in every containerd version; the `Any` type name is not used
    (containerd's has no `type.googleapis.com/` prefix, so `Any.Unpack` would fail anyway)."""
    try:
        if env.topic in _IMAGE_TOPICS:
            # ImageCreate/ImageUpdate/ImageDelete all carry the name in field 1.
            msg = containerd_images_pb2.ImageDelete.FromString(env.payload)
            return ImageEvent(_IMAGE_TOPICS[env.topic], msg.name) if msg.name else None
        if env.topic in _CONTENT_TOPICS:
            cmsg = containerd_content_events_pb2.ContentDelete.FromString(env.payload)
            if is_digest(cmsg.digest):
                return ContentEvent(_CONTENT_TOPICS[env.topic], cmsg.digest)
    except DecodeError:
        logger.warning(
            "undecodable containerd event", extra={"topic": env.topic, "type": env.type_url}
        )
    return None


def _image(msg: containerd_images_pb2.Image) -> Image:
    t = msg.target
    target = Descriptor(digest=t.digest, size=t.size, media_type=t.media_type)
    return Image(msg.name, target, dict(msg.labels))


def _info(msg: containerd_content_pb2.Info) -> ContentInfo:
    return ContentInfo(msg.digest, msg.size, dict(msg.labels))


def check_socket(socket_path: str) -> None:
    """Fail early and clearly when the socket path is wrong (not a socket, or missing)."""
    try:
        st = os.stat(socket_path)
    except FileNotFoundError:
        raise ContainerdUnavailable(
            f"containerd socket {socket_path} does not exist (is containerd running? "
            "check --containerd-sock)"
        ) from None
    except OSError as exc:
        raise ContainerdUnavailable(f"containerd socket {socket_path}: {exc.strerror}") from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise ContainerdUnavailable(f"{socket_path} is not a unix socket")


@asynccontextmanager
async def open_containerd(
    socket_path: str, namespace: str, *, check: bool = True, check_timeout: float = 10.0
) -> AsyncIterator[ContainerdClient]:
    """Connect to containerd for the duration of the block.

    With `check` (default) the socket must exist and containerd must answer Version within
    `check_timeout` seconds, else ContainerdUnavailable with a message saying what is wrong. The
    connection is re-established by itself on the next call after containerd restarts.
    """
    validate_namespace(namespace)
    if check:
        check_socket(socket_path)
    async with open_grpc_channel(socket_path) as channel:
        client = ContainerdClient(channel, socket_path, namespace)
        if check:
            v: Version | None = None
            with trio.move_on_after(check_timeout):
                v = await client.version()
                logger.info(
                    "connected to containerd",
                    extra={"socket": socket_path, "namespace": namespace, "version": v.version},
                )
            if v is None:
                raise ContainerdUnavailable(
                    f"containerd at {socket_path} did not answer within {check_timeout} s"
                )
        yield client
