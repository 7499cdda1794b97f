"""In-flight downloads: which blobs this node's containerd is receiving right now.

Why: a node that is still pulling a layer can already serve the bytes that have arrived (the
registry's `registry.serve.inflight`), so peers pulling the same image at the same moment need not
go upstream.  containerd keeps each download as an ingest, ``<content dir>/ingest/<hash>/`` with
``data`` (grows as bytes arrive), ``ref`` (for CRI pulls ``<namespace>/<n>/layer-sha256:<hex>``),
``total`` (expected size), ``startedat`` and ``updatedat``; when the blob is complete containerd
renames ``data`` to ``blobs/<alg>/<hex>`` and removes the directory, and an abort removes it.

Shape: `IngestTable` is the pure part: it is given what a scan of the directory found and says
which downloads started, which vanished (the driver then looks for the committed blob to tell a
commit from an abort), and which were restarted.  `IngestWatcher` is the Trio driver: it scans
every `interval` seconds (50 ms: new downloads are noticed well within 100 ms; a scan is one
`scandir` of a directory holding a handful of entries, in a worker thread, so no busy loop and no
inotify dependency) and reports changes to a callback.  Only layer downloads of the configured
namespace with a known total are reported: configs and manifests are small enough to be complete
before anyone could use them, and without a total nobody can be told the size.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

logger = logging.getLogger(__name__)

# `<namespace>/<lease or counter>/layer-<algorithm>:<hex>` as containerd's metadata store keys it
_LAYER_REF = re.compile(r"^([^/]+)/[^/]*/layer-(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")
MAX_TOTAL = 1 << 50  # sizes beyond this are not real layers
MAX_SMALL_FILE = 512  # ref/total/startedat files are tiny; never read more
LOOK_FOR_DIR = 0.25  # seconds between looks for a content directory not there yet
QUIET_FOR = 30.0  # a download whose data did not change for this long is not in flight


@dataclass(frozen=True, slots=True)
class IngestEntry:
    """One download found in the ingest directory."""

    digest: str
    ref: str
    directory: str  # the ingest's own directory (holding `data`)
    total: int
    started: str  # the `startedat` file's content: changes when containerd restarts the ingest


@dataclass(frozen=True, slots=True)
class IngestStarted:
    entry: IngestEntry


@dataclass(frozen=True, slots=True)
class IngestRestarted:
    """Same ref, but a new ingest (containerd aborted and began again): the old data is gone."""

    entry: IngestEntry


@dataclass(frozen=True, slots=True)
class IngestVanished:
    """The directory is gone: committed (the blob exists now) or aborted."""

    entry: IngestEntry


IngestChange = IngestStarted | IngestRestarted | IngestVanished


def layer_digest(ref: str, namespace: str) -> str | None:
    """The digest a CRI/ctr layer download's ref names, if it is in `namespace`; else None."""
    match = _LAYER_REF.match(ref.strip())
    if match is None or match.group(1) != namespace:
        return None
    return match.group(2)


def parse_total(raw: str) -> int | None:
    text = raw.strip()
    if not text.isdigit() or len(text) > 16:
        return None
    total = int(text)
    return total if 0 < total <= MAX_TOTAL else None


class IngestTable:
    """What downloads are in progress, from one directory scan to the next (no I/O)."""

    def __init__(self) -> None:
        self._by_dir: dict[str, IngestEntry] = {}

    def entries(self) -> list[IngestEntry]:
        return list(self._by_dir.values())

    def find(self, digest: str) -> IngestEntry | None:
        for entry in self._by_dir.values():
            if entry.digest == digest:
                return entry
        return None

    def update(self, found: list[IngestEntry]) -> list[IngestChange]:
        """Replace the known downloads by a scan's `found`; what changed, in a stable order."""
        changes: list[IngestChange] = []
        now = {entry.directory: entry for entry in found}
        for directory, old in sorted(self._by_dir.items()):
            new = now.get(directory)
            if new is None or new.digest != old.digest:
                changes.append(IngestVanished(old))
        for directory, new in sorted(now.items()):
            previous = self._by_dir.get(directory)
            if previous is None or previous.digest != new.digest:
                changes.append(IngestStarted(new))
            elif previous.started != new.started or previous.total != new.total:
                changes.append(IngestRestarted(new))
        self._by_dir = now
        return changes


def _read_small(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_SMALL_FILE).decode("utf-8", "replace")
    except OSError:
        return None


@dataclass(slots=True)
class _Parsed:
    """What one ingest directory said when its (inode, mtime) was last seen (the scan cache)."""

    identity: tuple[int, int]
    entry: IngestEntry | None  # None: not a layer download of our namespace
    has_bytes: bool = False


ScanCache = dict[str, _Parsed]


def scan_ingests(
    content_dir: str, namespace: str, cache: ScanCache | None = None
) -> list[IngestEntry]:
    """Blocking: the layer downloads of `namespace` under `<content_dir>/ingest` (none: absent).

    With a `cache` (kept by the caller between scans), a directory whose inode and mtime did not
    change is not read again: a scan of running downloads is then one `scandir` and a `stat` per
    download (files written into the directory, e.g. a restart's new `startedat`, change its
    mtime and so are read again)."""
    out: list[IngestEntry] = []
    cache = {} if cache is None else cache
    try:
        listing = list(os.scandir(os.path.join(content_dir, "ingest")))
    except OSError:
        cache.clear()
        return out
    for path in set(cache) - {item.path for item in listing}:
        del cache[path]
    for item in listing:
        try:
            if not item.is_dir(follow_symlinks=False):
                continue
            st = item.stat(follow_symlinks=False)
        except OSError:
            continue
        identity = (st.st_ino, st.st_mtime_ns)
        parsed = cache.get(item.path)
        if parsed is None or parsed.identity != identity:
            entry = _parse(item.path, namespace)
            if entry is None and not os.path.exists(os.path.join(item.path, "total")):
                cache.pop(item.path, None)  # still being created: read it again next time
                continue
            parsed = cache[item.path] = _Parsed(identity, entry)
        if parsed.entry is None:
            continue
        if not parsed.has_bytes:
            try:
                parsed.has_bytes = os.stat(os.path.join(item.path, "data")).st_size > 0
            except OSError:
                continue
        if not parsed.has_bytes:
            # containerd opens the ingest before it sends its GET (to the mirror first): until
            # bytes land it is no source, and advertising it would let a burst's nodes pick
            # each other's empty downloads while each waits for its own mirror request
            continue
        if not being_written(os.path.join(item.path, "data")):
            continue  # left behind (its containerd died or its pull failed): nobody feeds it
        out.append(parsed.entry)
    return out


def lease_break_signal_ignored() -> bool:
    """Whether a lease may be taken safely: when a writer opens a leased file the kernel sends
    the lease holder SIGIO, whose default action kills the process. Invariant: a lease is taken
    only while SIGIO is ignored. Ignoring it is set here when called on the main thread (the
    watcher does so at start; no part of the agent uses SIGIO); a worker thread can only read it."""
    if signal.getsignal(signal.SIGIO) == signal.SIG_IGN:
        return True
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGIO, signal.SIG_IGN)
        return True
    return False


def being_written(data_path: str, now: float | None = None) -> bool:
    """Blocking: is a process still writing this download?

    An ingest outlives the containerd that wrote it (a restart, a crash, a pull that failed and
    whose lease has not been collected yet); such a download never grows again, and a peer
    streaming from it would wait for nothing.  A live one is open for writing: then the kernel
    refuses a read lease (EAGAIN), which is asked for and, if granted, dropped at once.  Where
    leases are not available (no CAP_LEASE, a filesystem without them, SIGIO not ignored) a
    download counts as written if its data changed within QUIET_FOR seconds.
    """
    try:
        fd = os.open(data_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        if lease_break_signal_ignored():
            try:
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    return True  # open for writing by someone: containerd is on it
            else:
                # a writer opening now breaks the lease: SIGIO, ignored; its open waits for this
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
                return False  # nobody has it open for writing
        when = time.time() if now is None else now
        return when - os.fstat(fd).st_mtime < QUIET_FOR
    finally:
        os.close(fd)


def _parse(directory: str, namespace: str) -> IngestEntry | None:
    ref = _read_small(os.path.join(directory, "ref"))
    if ref is None:
        return None
    digest = layer_digest(ref, namespace)
    if digest is None:
        return None
    total = parse_total(_read_small(os.path.join(directory, "total")) or "")
    if total is None:
        return None
    started = _read_small(os.path.join(directory, "startedat")) or ""
    return IngestEntry(digest, ref.strip(), directory, total, started.strip())


def blob_path(content_dir: str, digest: str) -> str:
    algorithm, _, encoded = digest.partition(":")
    return os.path.join(content_dir, "blobs", algorithm, encoded)


OnChange = Callable[[IngestChange, bool], Awaitable[None]]  # (change, committed)


class IngestWatcher:
    """Scans containerd's ingest directory and reports downloads starting, restarting, ending.

    `on_change(change, committed)` is awaited for each change; `committed` is True for an
    `IngestVanished` whose blob now exists in the content directory.
    """

    def __init__(
        self,
        content_dir: Callable[[], Awaitable[str | None]],
        namespace: str,
        on_change: OnChange,
        *,
        interval: float = 0.05,
    ) -> None:
        if not interval > 0:
            raise ValueError("interval must be positive")
        self._content_dir = content_dir
        self._namespace = namespace
        self._on_change = on_change
        self._interval = interval
        self.table = IngestTable()
        self._cache: ScanCache = {}
        self.root: str | None = None
        self.scans = 0

    def find(self, digest: str) -> IngestEntry | None:
        return self.table.find(digest)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        lease_break_signal_ignored()  # on Trio's (main) thread: the scans' lease probes are safe
        root = await self._content_dir()
        if root is None:
            # containerd creates the directory with its first content: look again until then
            logger.warning("content directory not readable: in-flight downloads are not served")
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            while root is None:  # (a look is cheap: one access() once the path is known)
                await trio.sleep(max(self._interval, LOOK_FOR_DIR))
                root = await self._content_dir()
        self.root = root
        logger.info("watching in-flight downloads", extra={"ingest_dir": f"{root}/ingest"})
        await self.scan_once(root)
        task_status.started()
        while True:
            await trio.sleep(self._interval)
            await self.scan_once(root)

    async def scan_once(self, root: str) -> None:
        found = await trio.to_thread.run_sync(scan_ingests, root, self._namespace, self._cache)
        self.scans += 1
        for change in self.table.update(found):
            committed = False
            if isinstance(change, IngestVanished):
                committed = await trio.to_thread.run_sync(
                    os.path.exists, blob_path(root, change.entry.digest)
                )
            await self._on_change(change, committed)
