"""One body transfer reported as `registry.events.TransferProgress`: start, progress, end.

Why its own piece: the paths that move blob bodies (the front door serving a peer from disk, the
forwarder fetching from a peer) share the rules of a report: one id per transfer, a first report at
0 bytes, progress at most every `PROGRESS_INTERVAL` seconds, exactly one final done/failed.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable

from registry.events import PROGRESS_INTERVAL, MirrorEvents, TransferProgress

_ids = itertools.count(1)


class TransferReport:
    def __init__(
        self,
        events: MirrorEvents,
        *,
        key: str,
        peer: str,
        total: int | None,
        direction: str,
        source: str = "complete",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.events = events
        self.id = f"{direction}-{next(_ids)}"
        self.key, self.peer, self.total = key, peer, total
        self.direction, self.source = direction, source
        self.clock = clock
        self.last = -math.inf
        self.ended = False

    def _emit(self, nbytes: int, state: str) -> None:
        self.last = self.clock()
        self.events.emit(
            TransferProgress(
                at=time.time(),
                id=self.id,
                key=self.key,
                peer=self.peer,
                bytes=nbytes,
                total=self.total,
                state=state,
                direction=self.direction,
                source=self.source,
            )
        )

    def start(self) -> None:
        self._emit(0, "running")

    def progress(self, nbytes: int) -> None:
        if not self.ended and self.clock() - self.last >= PROGRESS_INTERVAL:
            self._emit(nbytes, "running")

    def end(self, nbytes: int, ok: bool) -> None:
        if not self.ended:
            self.ended = True
            self._emit(nbytes, "done" if ok else "failed")
