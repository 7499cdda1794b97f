"""`ContentStore` backed by this node's containerd: what the registry serves to peers.

Why: the agent keeps no storage of its own; it serves exactly the content containerd holds in the
configured namespace. Presence is always checked through containerd's API (Images.Get for tags,
Content.Info for digests) so content of other namespaces, or content already garbage-collected, is
never served. The bytes then come straight from the content directory
(`<root>/blobs/<alg>/<hex>`) when this process can read it (fast, and `BlobReader.path` lets the
registry use sendfile), else over gRPC `Content.Read`. An opened file descriptor stays readable even
if containerd's GC unlinks the file while a peer is still downloading it.

Media types are detected from the bytes (see `agent.containerd.media_types`) and cached by digest.

Content.Info is the expensive part of serving a small blob (a gRPC round trip through the asyncio
bridge), and a blob GET asks twice (describe, then open).  So a size containerd confirmed is
trusted for SIZE_TTL seconds (a file that is then found missing drops it at once), and concurrent
requests for one digest share one Info call.  A "not found" is never kept: content appears
without an event when a pull commits.
"""

from __future__ import annotations

import errno
import logging
import math
import os
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from agent.containerd.client import ContainerdClient, ContainerdUnavailable, NotFound
from agent.containerd.ingest import IngestWatcher, blob_path
from agent.containerd.media_types import (
    OCTET_STREAM,
    MediaTypeCache,
    may_be_json_object,
    media_type_of,
    needs_content,
)
from registry.interfaces import ContentNotFound, Descriptor, IngestFile
from registry.oci.reference import ReferenceError, parse_digest, parse_image_name

logger = logging.getLogger(__name__)

RECHECK_DIR = 5.0  # seconds between looks for a content directory that was not readable
SIZE_TTL = 2.0  # seconds a size from Content.Info is trusted without asking again
SIZE_ENTRIES = 4096  # digests remembered at most
READ_CHUNK = 1024 * 1024  # per pread; 1 MiB keeps the thread round trip cost negligible
SNIFF_BYTES = 64  # read first to tell JSON from layers before reading a whole small blob


def _check_range(size: int, offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset + length > size:
        raise ValueError(f"range {offset}+{length} is outside a blob of {size} bytes")


@dataclass(slots=True)
class FileBlobReader:
    """A blob read from an open file descriptor of the content directory."""

    digest: str
    size: int
    path: str | None
    fd: int

    def read(self, offset: int, length: int) -> AsyncIterator[bytes]:
        _check_range(self.size, offset, length)  # raises here, not on first iteration
        return self._read(offset, length)

    async def _read(self, offset: int, length: int) -> AsyncIterator[bytes]:
        end = offset + length
        while offset < end:
            n = min(READ_CHUNK, end - offset)
            chunk = await trio.to_thread.run_sync(os.pread, self.fd, n, offset)
            if not chunk:
                raise ContentNotFound(f"{self.digest} ended early at byte {offset}")
            offset += len(chunk)
            yield chunk


@dataclass(slots=True)
class GrpcBlobReader:
    """A blob streamed over containerd's Content.Read (no local file)."""

    client: ContainerdClient
    digest: str
    size: int
    path: str | None = None
    _streams: list[AsyncGenerator[bytes, None]] = field(default_factory=list)

    def read(self, offset: int, length: int) -> AsyncIterator[bytes]:
        _check_range(self.size, offset, length)
        stream = self._read(offset, length)
        self._streams.append(stream)  # closed when the open() block ends, even if not drained
        return stream

    async def _read(self, offset: int, length: int) -> AsyncGenerator[bytes, None]:
        if length == 0:
            return  # containerd reads to the end when asked for 0 bytes
        left = length
        try:
            async with self.client.read_content(self.digest, offset, length) as chunks:
                async for chunk in chunks:
                    if len(chunk) > left:
                        chunk = chunk[:left]
                    left -= len(chunk)
                    yield chunk
                    if left == 0:
                        return
        except NotFound as exc:
            raise ContentNotFound(f"{self.digest} is no longer in containerd") from exc
        if left:
            got = length - left
            raise ContentNotFound(f"{self.digest}: containerd returned {got}/{length} bytes")

    async def aclose(self) -> None:
        for stream in self._streams:
            await stream.aclose()
        self._streams.clear()


@dataclass
class _InfoCall:
    done: trio.Event = field(default_factory=trio.Event)
    size: int | None = None
    error: ContentNotFound | None = None


class ContainerdContentStore:
    """The registry's view of this node's containerd content (read-only).

    `content_path` is containerd's content directory (the one holding `blobs/`); empty means "ask
    containerd (introspection)". When the directory is not readable, or `direct_reads` is False,
    every read goes over gRPC.
    """

    def __init__(
        self,
        client: ContainerdClient,
        content_path: str = "",
        *,
        direct_reads: bool = True,
        media_types: MediaTypeCache | None = None,
    ) -> None:
        self._client = client
        self._configured_path = content_path
        self._direct_reads = direct_reads
        self._media_types = media_types if media_types is not None else MediaTypeCache()
        self._content_dir: str | None = None
        self._content_dir_known = False
        self._recheck_at = -math.inf  # no readable directory found: look again from then on
        self._introspected = ""  # the content root containerd reported (asked once)
        self._reported_mode = False
        self._lock = trio.Lock()
        self.ingests: IngestWatcher | None = None  # set by the agent: downloads in progress
        self._sizes: dict[str, tuple[float, int]] = {}  # digest -> (trusted until, size)
        self._asking: dict[str, _InfoCall] = {}  # Content.Info calls under way, by digest

    def find_inflight(self, digest: str) -> IngestFile | None:
        """The download of `digest` containerd is running now (an `InflightSource`)."""
        watcher = self.ingests
        if watcher is None or watcher.root is None:
            return None
        entry = watcher.find(digest)
        if entry is None:
            return None
        data = os.path.join(entry.directory, "data")
        return IngestFile(digest, entry.total, data, blob_path(watcher.root, digest))

    async def discard_download(self, digest: str) -> None:
        """Abort containerd's download of `digest` (a `registry.interfaces.DownloadDiscarder`).

        The mirror calls this when bytes it already passed on turn out not to match the digest:
        containerd then holds a bad prefix, and a retry would resume from it (Range) and fail
        at commit again; aborted, the retry downloads afresh."""
        with trio.move_on_after(5.0):
            try:
                statuses = await self._client.list_statuses()
            except ContainerdUnavailable as exc:
                logger.warning("cannot list downloads", extra={"key": digest, "error": str(exc)})
                return
            for status in statuses:
                if status.expected != digest and not status.ref.endswith(digest):
                    continue
                try:
                    await self._client.abort_ingest(status.ref)
                    logger.warning(
                        "aborted a download fed bad bytes by a peer",
                        extra={"key": digest, "ref": status.ref, "offset": status.offset},
                    )
                except (NotFound, ContainerdUnavailable) as exc:
                    logger.info("download not aborted", extra={"key": digest, "error": str(exc)})

    async def content_dir(self, *, look_now: bool = False) -> str | None:
        """The readable content directory in use, or None when reads go over gRPC.

        A directory found is kept.  Not finding one is looked at again every RECHECK_DIR
        seconds, or at once with `look_now` (content containerd says it holds is being opened):
        containerd creates `blobs/` with the first content, so an agent that starts on a fresh
        node would otherwise read everything over gRPC for good (no sendfile).
        """
        if self._content_dir_known:
            return self._content_dir
        if trio.current_time() < self._recheck_at and not look_now:
            return None
        async with self._lock:
            if not self._content_dir_known and (
                look_now or trio.current_time() >= self._recheck_at
            ):
                found = await self._find_content_dir()
                if found is not None or not self._direct_reads:
                    self._content_dir = found
                    self._content_dir_known = True
                else:
                    self._recheck_at = trio.current_time() + RECHECK_DIR
                if found is not None or not self._reported_mode:
                    self._reported_mode = True
                    logger.info(
                        "content store reads",
                        extra={"mode": "file" if found else "grpc", "content_path": found or ""},
                    )
        return self._content_dir

    async def _find_content_dir(self) -> str | None:
        if not self._direct_reads:
            return None
        path = self._configured_path or self._introspected
        if not path:
            try:
                path = self._introspected = await self._client.content_root() or ""
            except ContainerdUnavailable:
                raise
            except Exception as exc:  # an old containerd without introspection: use gRPC
                logger.warning("content root unknown, reading over gRPC", extra={"error": str(exc)})
                return None
        # containerd makes `ingest/` when its content store starts and `blobs/` at the first
        # commit: a node that has pulled nothing yet has only the former
        readable = [os.path.join(path, sub) for sub in ("blobs", "ingest")]
        if path and any(os.access(p, os.R_OK | os.X_OK) for p in readable):
            return path
        log = logger.debug if self._reported_mode else logger.warning  # once, not every look
        log("content directory not readable, reading over gRPC", extra={"content_path": path})
        return None

    async def resolve_tag(self, reference: str) -> str:
        try:
            ref = parse_image_name(reference, allow_tag_only=True)
        except ReferenceError as exc:
            raise ContentNotFound(f"invalid reference {reference[:200]!r}: {exc}") from exc
        if ref.tag_key is None or ref.digest is not None:
            raise ContentNotFound(f"{reference[:200]!r} is not a registry/repo:tag reference")
        try:
            image = await self._client.get_image(ref.tag_key)
        except NotFound as exc:
            raise ContentNotFound(f"no image {ref.tag_key} in containerd") from exc
        except ContainerdUnavailable as exc:
            logger.warning("containerd unavailable", extra={"error": str(exc)})
            raise ContentNotFound(f"containerd unavailable: {exc}") from exc
        return image.target.digest

    async def _info_size(self, digest: str) -> int:
        try:
            parse_digest(digest)
        except ReferenceError as exc:
            raise ContentNotFound(str(exc)) from exc
        while True:
            known = self._sizes.get(digest)
            if known is not None and known[0] > trio.current_time():
                return known[1]
            call = self._asking.get(digest)
            if call is None:
                break
            await call.done.wait()  # someone is asking already: take their answer
            if call.error is not None:
                raise call.error
            if call.size is not None:
                return call.size
            # that call was cancelled: ask again
        call = self._asking[digest] = _InfoCall()
        try:
            call.size = await self._ask_size(digest)
        except ContentNotFound as exc:
            call.error = exc
            raise
        finally:
            del self._asking[digest]
            call.done.set()
        self._sizes.pop(digest, None)
        self._sizes[digest] = (trio.current_time() + SIZE_TTL, call.size)
        while len(self._sizes) > SIZE_ENTRIES:
            del self._sizes[next(iter(self._sizes))]
        return call.size

    def surely_absent(self, digest: str) -> bool:
        """No file for `digest` in the readable content directory (containerd commits content
        by renaming its file into `blobs/`): a stat, where Content.Info is a gRPC round trip
        through the asyncio bridge.  The agent may see that directory differently from
        containerd (another mount namespace, a remount), so the registry uses this only for
        this node's own requests, which go to peers when it is wrong."""
        root = self._content_dir if self._content_dir_known else None
        algorithm, _, encoded = digest.partition(":")
        if root is None or not encoded or "/" in encoded or "/" in algorithm:
            return False
        try:
            os.stat(os.path.join(root, "blobs", algorithm, encoded))
        except FileNotFoundError:
            return os.path.isdir(root)
        except OSError:
            return False
        return False

    def forget(self, digest: str) -> None:
        """Ask containerd about `digest` next time (its file turned out missing)."""
        self._sizes.pop(digest, None)

    async def _ask_size(self, digest: str) -> int:
        try:
            info = await self._client.content_info(digest)
        except NotFound as exc:
            raise ContentNotFound(f"{digest} is not in containerd") from exc
        except ContainerdUnavailable as exc:
            logger.warning("containerd unavailable", extra={"error": str(exc)})
            raise ContentNotFound(f"containerd unavailable: {exc}") from exc
        return info.size

    async def describe(self, digest: str) -> Descriptor:
        size = await self._info_size(digest)
        media_type = self._media_types.get(digest)
        if media_type is None:
            media_type = OCTET_STREAM
            if needs_content(size):
                async with self._open_present(digest, size) as reader:
                    head = min(size, SNIFF_BYTES)
                    data = b"".join([chunk async for chunk in reader.read(0, head)])
                    if may_be_json_object(data):
                        if size > head:
                            data += b"".join([c async for c in reader.read(head, size - head)])
                        media_type = media_type_of(size, data)
            self._media_types.put(digest, media_type)
        return Descriptor(digest=digest, size=size, media_type=media_type)

    @asynccontextmanager
    async def open(self, digest: str) -> AsyncIterator[FileBlobReader | GrpcBlobReader]:
        size = await self._info_size(digest)
        async with self._open_present(digest, size) as reader:
            yield reader

    @asynccontextmanager
    async def _open_present(
        self, digest: str, size: int
    ) -> AsyncIterator[FileBlobReader | GrpcBlobReader]:
        try:
            root = await self.content_dir(look_now=True)
        except ContainerdUnavailable as exc:
            raise ContentNotFound(f"containerd unavailable: {exc}") from exc
        fd = -1
        path: str | None = None
        if root is not None:
            algorithm, _, encoded = digest.partition(":")
            path = os.path.join(root, "blobs", algorithm, encoded)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                if os.fstat(fd).st_size != size:
                    logger.warning("blob file size differs", extra={"digest": digest})
                    os.close(fd)
                    fd = -1
            except OSError as exc:
                if exc.errno == errno.ENOENT and digest in self._sizes:
                    # a size remembered for content deleted since: containerd has the last word
                    self.forget(digest)
                    size = await self._ask_size(digest)  # ContentNotFound when it is gone
                else:
                    logger.warning(
                        "blob file unreadable, reading over gRPC",
                        extra={"digest": digest, "error": str(exc)},
                    )
                fd = -1
        if fd >= 0:
            try:
                yield FileBlobReader(digest, size, path, fd)
            finally:
                os.close(fd)
        else:
            reader = GrpcBlobReader(self._client, digest, size)
            try:
                yield reader
            finally:
                with trio.CancelScope(shield=True):
                    await reader.aclose()
