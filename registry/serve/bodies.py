"""Response bodies that are more than bytes: a stored blob, a blob still downloading, a mirrored
blob.

Why: each body is written once and leaves by whichever way the server offers.  A file body
(`StoredBody`, `GrowingBody`) is opened before the response head is sent (content that vanished
becomes a 404, not a cut body) and then either goes out as ASGI `http.response.zerocopysend`
messages (`zero_copy`: the server sendfiles the file's bytes) or, on a server without that
extension, as chunks (`__aiter__`).  `MirrorBody` is the one consumer of a mirror request's items
(its reader of a shared fetch, or its fetch task's channel): it yields pooled chunks as
memoryviews and gives each buffer back once the server's `send` returned, which both servers
guarantee only happens once they no longer need the bytes.
Invariants: a body once opened reports its transfer's start and end exactly once; a mirrored
body stops reading its fetch as soon as the body ends, is cut, or is abandoned (the client left),
and the fetch is cancelled once no response reads it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, BinaryIO

import trio
from quart.wrappers.response import ResponseBody

from registry.interfaces import BlobReader, ContentNotFound, ContentStore, Descriptor, IngestFile
from registry.mirror.buffers import Chunk
from registry.mirror.job import ItemSource, MirrorAbort, MirrorFailure, MirrorItem
from registry.mirror.transfer_report import TransferReport
from registry.serve.inflight import (
    GrowingFile,
    InflightUploads,
    IngestBroken,
    upload_chunks,
    upload_growing,
)
from registry.serve.responses import BodyCut

__all__ = ["ChannelItems", "FileBody", "GrowingBody", "MirrorBody", "Send", "StoredBody"]

Send = Callable[[dict[str, Any]], Awaitable[None]]  # an ASGI send
REPORT_SLICE = 8 << 20  # bytes per zerocopysend message between progress reports


class FileBody(ResponseBody):
    """A body backed by a file; `async with` opens it (ContentNotFound: gone)."""

    def __init__(self, offset: int, length: int, report: TransferReport | None) -> None:
        self.offset = offset
        self.length = length
        self.report = report
        self.sent = 0

    def has_file(self) -> bool:
        """Whether a file descriptor backs the bytes (once opened)."""
        return True

    async def zero_copy(self, send: Send) -> bool:
        """Send the bytes as `http.response.zerocopysend` messages (more_body set); False, with
        nothing sent, when no file descriptor backs them (then iterate instead)."""
        raise NotImplementedError

    async def close(self) -> None:
        """End the transfer report and let go of the file (after the last send)."""
        await self.__aexit__(None, None, None)  # type: ignore[arg-type]

    def _begin(self) -> None:
        if self.report is not None:
            self.report.start()

    def _progress(self, count: int) -> None:
        self.sent += count
        if self.report is not None:
            self.report.progress(self.sent)

    def _end(self) -> None:
        if self.report is not None:
            self.report.end(self.sent, ok=self.sent == self.length)

    def __aiter__(self) -> AsyncIterator[bytes]:
        raise NotImplementedError


class StoredBody(FileBody):
    """`length` bytes from `offset` of a blob held in the store."""

    def __init__(
        self,
        store: ContentStore,
        descriptor: Descriptor,
        offset: int,
        length: int,
        report: TransferReport | None = None,
    ) -> None:
        super().__init__(offset, length, report)
        self.store = store
        self.descriptor = descriptor
        self._stack = AsyncExitStack()
        self._reader: BlobReader | None = None
        self._file: BinaryIO | None = None  # the blob's file, when one backs it

    async def __aenter__(self) -> StoredBody:
        reader = await self._stack.enter_async_context(self.store.open(self.descriptor.digest))
        try:
            if reader.size != self.descriptor.size:
                raise ContentNotFound(f"{self.descriptor.digest} changed")
            if reader.path is not None:  # held open from here: the head promises these bytes
                fd = os.open(reader.path, os.O_RDONLY | os.O_CLOEXEC)
                self._file = self._stack.enter_context(os.fdopen(fd, "rb", buffering=0))
        except BaseException:
            await self._stack.aclose()
            raise
        self._reader = reader
        self._begin()
        return self

    async def __aexit__(
        self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._end()
        await self._stack.aclose()

    def has_file(self) -> bool:
        return self._file is not None

    async def zero_copy(self, send: Send) -> bool:
        file = self._file
        if file is None:
            return False
        while self.sent < self.length:
            count = min(REPORT_SLICE, self.length - self.sent)
            await send(
                {
                    "type": "http.response.zerocopysend",
                    "file": file,
                    "offset": self.offset + self.sent,
                    "count": count,
                    "more_body": True,
                }
            )
            self._progress(count)
        return True

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        assert self._reader is not None, "iterated before `async with`"
        async for chunk in self._reader.read(self.offset, self.length):
            self._progress(len(chunk))
            yield chunk


class GrowingBody(FileBody):
    """`length` bytes from `offset` of a blob this node is still downloading
    (`registry.serve.inflight`): sent as they land; a failed download cuts the body."""

    def __init__(
        self,
        uploads: InflightUploads,
        ingest: IngestFile,
        offset: int,
        length: int,
        peer: str,
        written: Callable[[], bool] | None,
        report: TransferReport | None = None,
    ) -> None:
        super().__init__(offset, length, report)
        self.uploads = uploads
        self.growing = GrowingFile(ingest, written=written)
        self.peer = peer

    async def __aenter__(self) -> GrowingBody:
        try:
            self.growing.open()
        except OSError as exc:
            raise ContentNotFound(self.growing.ingest.digest) from exc
        self._begin()
        return self

    async def __aexit__(
        self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._end()
        self.growing.close()

    async def zero_copy(self, send: Send) -> bool:
        file = os.fdopen(self.growing.fd, "rb", buffering=0, closefd=False)

        async def send_range(offset: int, count: int) -> None:
            await send(
                {
                    "type": "http.response.zerocopysend",
                    "file": file,
                    "offset": offset,
                    "count": count,
                    "more_body": True,
                }
            )

        with file:
            try:  # the upload reports its progress to this body's report, and ends it
                self.sent = await upload_growing(
                    self.growing,
                    self.offset,
                    self.length,
                    self.peer,
                    send_range,
                    self.uploads,
                    self.report,
                )
            except IngestBroken as exc:
                raise BodyCut(f"in-flight upload cut: {exc}") from exc
        return True

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        try:
            chunks = upload_chunks(self.growing, self.offset, self.length, self.peer, self.uploads)
            async for chunk in chunks:
                self._progress(len(chunk))
                yield chunk
        except IngestBroken as exc:
            raise BodyCut(f"in-flight upload cut: {exc}") from exc


class ChannelItems:
    """The items of a request's own fetch task, as an `ItemSource`: closing it cancels the task
    (`fetch`, its cancel scope; not once the task gave its final answer, a failure, so that it
    ends on its own and reports its outcome) and gives back the buffers of chunks still queued."""

    def __init__(
        self, receive: trio.MemoryReceiveChannel[MirrorItem], fetch: trio.CancelScope
    ) -> None:
        self._receive = receive
        self._fetch = fetch
        self._answered = False  # the fetch's final answer (a failure) came

    async def receive(self) -> MirrorItem:
        item = await self._receive.receive()
        if isinstance(item, MirrorFailure):
            self._answered = True
        return item

    def close(self) -> None:
        if not self._answered:
            self._fetch.cancel()
        while True:
            try:
                item = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            if isinstance(item, Chunk):
                item.release()
        self._receive.close()


class MirrorBody(ResponseBody):
    """The body of a blob answered from peers: the items of its `ItemSource` (a shared fetch's
    reader, or its own fetch task's channel), closed as soon as the body is done, cut, or
    abandoned, so a client that leaves stops its fetch at once."""

    def __init__(self, source: ItemSource) -> None:
        self.source = source
        self.sent = 0

    async def __aenter__(self) -> MirrorBody:
        return self

    async def __aexit__(
        self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop reading: the fetch stops unless another response reads it."""
        self.source.close()

    def __aiter__(self) -> AsyncIterator[bytes | bytearray | memoryview]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes | bytearray | memoryview]:
        while True:
            try:
                item = await self.source.receive()
            except trio.EndOfChannel:
                return
            if isinstance(item, Chunk):
                try:
                    with item.view() as view:
                        yield view  # the server is done with it once its send returned
                finally:
                    item.release()
                self.sent += len(item)
            elif isinstance(item, bytes | bytearray):
                if item:
                    yield item
                    self.sent += len(item)
            elif isinstance(item, MirrorAbort):
                raise BodyCut(item.reason)
