"""One body transfer: its progress record (`Transfer`) and the one publisher of its reports.

Why one record: every path that moves a blob body (the app serving a peer from disk or from a
download still in progress, a mirror run fetching from peers) keeps the same account: who, what, how
far, how it ended.  The debug page's rows (`registry.serve.inflight.InflightUploads`) and the
`registry.events.TransferProgress` events are both made from it, so they cannot disagree.

Invariants of a report: one id per transfer; a first report at 0 bytes; progress at most every
`PROGRESS_INTERVAL` seconds; exactly one final done/failed, after which nothing changes.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from registry.events import PROGRESS_INTERVAL, MirrorEvents, TransferProgress

__all__ = ["Transfer", "TransferReport"]

_ids = itertools.count(1)


@dataclass(slots=True)
class Transfer:
    """One body moving between this node and a peer, as far as it got."""

    id: str
    key: str
    peer: str  # host:port or host
    total: int | None  # body bytes when known
    direction: str  # "in": fetched from the peer; "out": served to it
    source: str  # the provider's record state: "complete" | "inflight"
    started: float  # unix time
    bytes: int = 0  # body bytes so far
    state: str = "running"  # running | done | failed

    def event(self) -> TransferProgress:
        return TransferProgress(
            at=time.time(),
            id=self.id,
            key=self.key,
            peer=self.peer,
            bytes=self.bytes,
            total=self.total,
            state=self.state,
            direction=self.direction,
            source=self.source,
        )

    def as_dict(self) -> dict[str, object]:
        """The debug page's row."""
        return {
            "id": self.id,
            "key": self.key,
            "peer": self.peer,
            "direction": self.direction,
            "bytes": self.bytes,
            "total": self.total,
            "started": self.started,
            "state": self.state,
            "source": self.source,
        }


class TransferReport:
    """Keeps a `Transfer` up to date and publishes it to `events` (None: kept, not published)."""

    def __init__(
        self,
        events: MirrorEvents | None,
        *,
        key: str,
        peer: str,
        total: int | None,
        direction: str,
        source: str = "complete",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.events = events
        self.transfer = Transfer(
            f"{direction}-{next(_ids)}", key, peer, total, direction, source, time.time()
        )
        self.clock = clock
        self.last = -math.inf  # when the last report went out (`clock`)
        self.ended = False

    @property
    def id(self) -> str:
        return self.transfer.id

    def _emit(self) -> None:
        self.last = self.clock()
        if self.events is not None:
            self.events.emit(self.transfer.event())

    def via(self, peer: str, source: str) -> None:
        """The peer (and its record state) the bytes come from now (a resumed stream)."""
        if not self.ended:
            self.transfer.peer, self.transfer.source = peer, source

    def start(self) -> None:
        self._emit()

    def progress(self, nbytes: int) -> None:
        """`nbytes` body bytes so far (recorded always, reported at most every interval)."""
        if self.ended:
            return
        self.transfer.bytes = nbytes
        if self.clock() - self.last >= PROGRESS_INTERVAL:
            self._emit()

    def end(self, nbytes: int, ok: bool) -> None:
        if not self.ended:
            self.ended = True
            self.transfer.bytes = nbytes
            self.transfer.state = "done" if ok else "failed"
            self._emit()
