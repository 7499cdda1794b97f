"""Serving a blob this node is still downloading: a body that follows a growing file.

Why its own module: both ways a body leaves (zero-copy sends on our server, chunks on Hypercorn:
`registry.serve.bodies.GrowingBody`) serve in-flight blobs by the same rules: the response announces
the full size (the ingest's `total`); bytes go out as they land in the ingest's `data` file; only
the contiguous written prefix is sent (the file size, cut at the first hole `SEEK_HOLE` reports, so
a containerd that writes ranges out of order is never read past a gap); when containerd commits, it
renames `data` to the blob file, and the descriptor opened at the start keeps reading the same
bytes.  If the file stops growing for `stall_timeout`, shrinks (truncated), or is no longer the
ingest's nor the committed blob's file (aborted, or restarted as a new file), the body is cut short:
the requester then resumes elsewhere.  Bytes already on disk go out by `os.sendfile` where the
server offers it.

`InflightUploads` counts and describes the uploads in progress (the `spegla_inflight_uploads`
gauge, and the rows the debug page lists); one per registry, passed to whoever serves (no
process-wide state).  Each upload's progress is the one transfer record
(`registry.mirror.transfer_report`), the same its `TransferProgress` events are made from.
"""

from __future__ import annotations

import errno
import logging
import os
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import trio
from prometheus_client import Gauge

from registry.interfaces import IngestFile
from registry.mirror.transfer_report import Transfer, TransferReport

__all__ = [
    "INFLIGHT_UPLOADS",
    "GrowingFile",
    "InflightSettings",
    "InflightUploads",
    "IngestBroken",
    "SendRange",
    "Upload",
    "growing_chunks",
    "send_growing",
    "upload_chunks",
    "upload_growing",
]

logger = logging.getLogger(__name__)

INFLIGHT_UPLOADS = Gauge(
    "spegla_inflight_uploads",
    "Blob responses this node is streaming from a download still in progress.",
)

SENDFILE_CHUNK = 8 * 1024 * 1024


class IngestBroken(Exception):
    """The in-flight download can no longer supply the bytes: the response must be cut short."""


@dataclass(frozen=True, slots=True)
class InflightSettings:
    poll_interval: float = 0.025  # how often a waiting response looks for new bytes
    stall_timeout: float = 10.0  # no new bytes for this long: cut (the requester resumes elsewhere)
    # while no bytes come, how often to ask whether a process still writes the download (its
    # containerd may have died: then the body is cut at once, not after `stall_timeout`)
    writer_check_interval: float = 0.5
    read_size: int = 1024 * 1024


class GrowingFile:
    """An ingest's `data` file, opened once, read as its contiguous prefix grows."""

    def __init__(
        self,
        ingest: IngestFile,
        settings: InflightSettings | None = None,
        written: Callable[[], bool] | None = None,
    ) -> None:
        self.ingest = ingest
        self.settings = settings or InflightSettings()
        # does a process still write this download? (the store's in-flight table says; None:
        # unknown, only the stall bound applies)
        self.written = written
        self.fd = -1
        self._identity: tuple[int, int] = (0, 0)
        self._largest = 0  # the largest size seen: a file smaller than that was truncated

    def open(self) -> None:
        """Open the data file (or the committed blob, if the commit just happened).

        Raises OSError when neither exists any more.
        """
        try:
            self.fd = os.open(self.ingest.data_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self.fd = os.open(self.ingest.blob_path, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(self.fd)
        self._identity = (st.st_dev, st.st_ino)
        self._largest = st.st_size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> GrowingFile:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def size(self) -> int:
        return self.ingest.size

    def contiguous_end(self, position: int) -> int:
        """End of the bytes readable from `position` on without crossing a hole (`position` if
        none yet); IngestBroken if the file shrank."""
        file_size = os.fstat(self.fd).st_size
        if file_size < self._largest:
            raise IngestBroken(f"{self.ingest.digest}: the download shrank to {file_size} bytes")
        self._largest = file_size
        if file_size <= position:
            return position
        try:
            end = os.lseek(self.fd, position, os.SEEK_HOLE)
        except OSError as exc:  # no SEEK_HOLE here: the file size is the bound
            if exc.errno not in (errno.EINVAL, errno.ENXIO, errno.EOPNOTSUPP):
                raise
            end = file_size
        return min(end, file_size, self.ingest.size)

    def still_ours(self) -> bool:
        """True while our file is the ingest's data file or the committed blob."""
        for path in (self.ingest.data_path, self.ingest.blob_path):
            try:
                st = os.stat(path)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == self._identity:
                return True
        return False

    async def wait_beyond(self, position: int) -> int:
        """Wait until bytes past `position` are readable; return the end of the readable run.

        Raises IngestBroken when the download stalled, shrank, or was aborted or restarted.
        """
        settings = self.settings
        now = trio.current_time()
        give_up = now + settings.stall_timeout
        ask_writer = now + settings.writer_check_interval
        while True:
            end = self.contiguous_end(position)
            if end > position:
                return end
            if not self.still_ours():
                raise IngestBroken(f"{self.ingest.digest}: the download was aborted or restarted")
            if self.written is not None and trio.current_time() >= ask_writer:
                ask_writer = trio.current_time() + settings.writer_check_interval
                if not self.written() and self.contiguous_end(position) <= position:
                    raise IngestBroken(f"{self.ingest.digest}: nobody writes the download any more")
            if trio.current_time() >= give_up:
                raise IngestBroken(
                    f"{self.ingest.digest}: no new bytes for {settings.stall_timeout} s"
                )
            await trio.sleep(settings.poll_interval)


SendRange = Callable[[int, int], Awaitable[None]]  # (offset, count): send those bytes of the file


async def send_growing(
    growing: GrowingFile,
    offset: int,
    length: int,
    send_range: SendRange,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Send `length` bytes from `offset` of the growing file with `send_range` (zero-copy sends
    where the server offers them), each run as soon as it is on disk; the count sent (IngestBroken
    when the download fails first)."""
    position = offset
    end = offset + length
    while position < end:
        readable = await growing.wait_beyond(position)
        count = min(SENDFILE_CHUNK, min(readable, end) - position)
        await send_range(position, count)
        position += count
        if progress is not None:
            progress(count)
    return length


async def growing_chunks(
    growing: GrowingFile,
    offset: int,
    length: int,
    progress: Callable[[int], None] | None = None,
) -> AsyncIterator[bytes]:
    """The same bytes as chunks (for the Quart app), read with pread in a worker thread."""
    end = offset + length
    position = offset
    readable = offset
    while position < end:
        if readable <= position:
            readable = await growing.wait_beyond(position)
        count = min(growing.settings.read_size, min(readable, end) - position)
        chunk = await trio.to_thread.run_sync(os.pread, growing.fd, count, position)
        if not chunk:
            readable = position
            continue
        position += len(chunk)
        if progress is not None:
            progress(len(chunk))
        yield chunk


@dataclass(slots=True)
class Upload:
    """One response streaming an in-flight blob: its transfer record and the file it reads."""

    report: TransferReport  # the progress record (and its events, when published)
    growing: GrowingFile | None = None  # the file it reads (for `InflightUploads.lagging`)
    offset: int = 0  # where in the blob it started

    @property
    def transfer(self) -> Transfer:
        return self.report.transfer

    def behind(self) -> int:
        """Bytes this node's download holds that this upload has not sent yet (0: keeping up)."""
        if self.growing is None or self.growing.fd < 0:
            return 0
        try:
            written = os.fstat(self.growing.fd).st_size
        except OSError:
            return 0
        total = self.transfer.total or 0
        return max(0, min(written, total) - (self.offset + self.transfer.bytes))

    def add(self, count: int) -> None:
        self.report.progress(self.transfer.bytes + count)


@dataclass(slots=True)
class InflightUploads:
    """The uploads of in-flight blobs running now, plus the last few finished (for debugging)."""

    keep_finished: int = 20
    running: dict[str, Upload] = field(default_factory=dict)
    finished: deque[Transfer] = field(default_factory=deque)
    served: int = 0
    cut: int = 0

    def start(
        self, key: str, peer: str, total: int, report: TransferReport | None = None
    ) -> Upload:
        """Count an upload of `key` to `peer`; `report`: its transfer's publisher (None: a
        record kept here only)."""
        if report is None:
            report = TransferReport(
                None, key=key, peer=peer, total=total, direction="out", source="inflight"
            )
            report.start()
        upload = Upload(report)
        self.running[upload.transfer.id] = upload
        INFLIGHT_UPLOADS.set(len(self.running))
        return upload

    def end(self, upload: Upload, ok: bool) -> None:
        upload.report.end(upload.transfer.bytes, ok)
        self.running.pop(upload.transfer.id, None)
        INFLIGHT_UPLOADS.set(len(self.running))
        if ok:
            self.served += 1
        else:
            self.cut += 1
        self.finished.append(upload.transfer)
        while len(self.finished) > self.keep_finished:
            self.finished.popleft()

    def lagging(self, limit: int) -> bool:
        """True when an upload of a blob still downloading here is more than `limit` bytes behind
        the download: this node's uplink, not its download, is the bottleneck, so another upload
        would only slow the running ones (`registry.burst.provider_choice.UploadSlots`)."""
        return any(upload.behind() > limit for upload in self.running.values())

    def snapshot(self) -> list[dict[str, object]]:
        running = [u.transfer for u in self.running.values()]
        return [t.as_dict() for t in [*running, *self.finished]]


async def upload_growing(
    growing: GrowingFile,
    offset: int,
    length: int,
    peer: str,
    send_range: SendRange,
    uploads: InflightUploads,
    report: TransferReport | None = None,
) -> int:
    """`send_growing`, counted as an upload in `uploads` (IngestBroken: the caller cuts the
    response); its progress goes to `report` when given (its transfer record is the row)."""
    with _counted_upload(uploads, growing, peer, offset, report) as upload:
        return await send_growing(growing, offset, length, send_range, upload.add)


async def upload_chunks(
    growing: GrowingFile, offset: int, length: int, peer: str, uploads: InflightUploads
) -> AsyncIterator[bytes]:
    """`growing_chunks`, counted as an upload in `uploads`; closes the file when done
    (IngestBroken cuts)."""
    try:
        with _counted_upload(uploads, growing, peer, offset, None) as upload:
            async for chunk in growing_chunks(growing, offset, length, upload.add):
                yield chunk
    finally:
        growing.close()


@contextmanager
def _counted_upload(
    uploads: InflightUploads,
    growing: GrowingFile,
    peer: str,
    offset: int,
    report: TransferReport | None,
) -> Iterator[Upload]:
    """An upload of `growing` to `peer` in `uploads` while the block runs: served if it ends
    normally, cut if it raises (an IngestBroken is logged)."""
    upload = uploads.start(growing.ingest.digest, peer, growing.size, report)
    upload.growing, upload.offset = growing, offset
    ok = False
    try:
        yield upload
        ok = True
    except IngestBroken as exc:
        logger.info(
            "in-flight upload cut",
            extra={"key": upload.transfer.key, "peer": peer, "error": str(exc)},
        )
        raise
    finally:
        uploads.end(upload, ok)
