"""What one mirror request reports: progress while a blob body goes out, then one outcome.

Why its own module: the mirror run decides where bytes come from; this keeps the account of what
went out (head sent, body bytes, the serving peer and the ones a broken stream resumed from, why
it missed or was cut short) and turns it into events (`registry.events`: a blob body's progress
through the one transfer record, `registry.mirror.transfer_report`, then one `MirrorOutcome`) and
the request's one INFO line (`make demo` reads it).
"""

from __future__ import annotations

import logging
import time

from registry.burst.attempts import MirrorAttempts
from registry.events import MirrorEvents, MirrorOutcome
from registry.interfaces import Peer, PeerState
from registry.mirror.buffers import Chunk
from registry.mirror.job import MirrorFailure, MirrorHead, MirrorItem
from registry.mirror.transfer_report import TransferReport
from registry.mirror.verification import peer_address
from registry.oci.reference import Reference

__all__ = ["MirrorReport", "log_outcome"]

logger = logging.getLogger("registry.mirror.forwarder")  # one name for the mirror path's lines


class MirrorReport:
    """The account of one mirror request, fed with every item handed to the response."""

    def __init__(
        self,
        events: MirrorEvents,
        ref: Reference,
        method: str,
        is_blob: bool,
        attempts: MirrorAttempts,
    ) -> None:
        self.events = events
        self.ref = ref
        self.method = method
        self.is_blob = is_blob
        self.is_head = method == "HEAD"
        self.attempts = attempts
        self.started = time.monotonic()
        self.hit = False  # a MirrorHead went out
        self.delivered = 0  # body bytes handed to the response
        self.reason = ""  # why it missed or was cut short
        self.serving: list[Peer] = []  # the peer whose answer is being sent, then resumed-from
        self.hedged = False  # a second provider was asked while one was slow
        self.body: TransferReport | None = None  # a blob GET's body, once its head went out

    def gone(self, why: str) -> None:
        """The response stopped taking items (the first reason given sticks)."""
        self.reason = self.reason or why

    def sent(self, item: MirrorItem) -> None:
        """`item` was handed to the response."""
        if isinstance(item, Chunk | bytes | bytearray):
            self.delivered += len(item)
            if self.body is not None:
                self._via(self.body)
                self.body.progress(self.delivered)
        elif isinstance(item, MirrorHead):
            self.hit = True
            if self.is_blob and not self.is_head:
                self.body = TransferReport(
                    self.events,
                    key=self.ref.identifier,
                    peer="",
                    total=_content_length(item.headers),
                    direction="in",
                )
                self._via(self.body)
                self.body.start()
        elif isinstance(item, MirrorFailure):
            self.reason = item.message
        else:
            self.reason = item.reason

    def _via(self, body: TransferReport) -> None:
        peer = self.serving[-1] if self.serving else None
        if peer is None:
            body.via("", "complete")
        else:
            body.via(peer_address(peer), peer.state.value)

    def finish(self) -> None:
        """Report the request's outcome once, at its end (never per chunk): an event, a log line."""
        outcome = MirrorOutcome(
            at=time.time(),
            key=self.ref.identifier,
            registry=self.ref.registry,
            method=self.method,
            hit=self.hit,
            peer=peer_address(self.serving[0]) if self.hit and self.serving else None,
            resumed_from=tuple(peer_address(peer) for peer in self.serving[1:]) if self.hit else (),
            bytes=self.delivered,
            duration_ms=round((time.monotonic() - self.started) * 1000, 3),
            attempts=self.attempts.fetched,
            reason=self.reason or ("" if self.hit else "no answer"),
            hedged=self.hedged,
            inflight=bool(self.hit and self.serving)
            and self.serving[0].state is PeerState.INFLIGHT,
        )
        if self.body is not None:
            self._via(self.body)
            self.body.end(self.delivered, ok=not self.reason)
        self.events.emit(outcome)
        log_outcome(outcome)


def log_outcome(outcome: MirrorOutcome) -> None:
    """The request's INFO line (`make demo` reads it; the debug page takes the event instead).

    `cache` hit means a response head from a peer went out (the hit/miss counters count the same
    way); `peer` is the provider whose answer was sent (`resumed_from` lists the ones a broken
    stream continued from); `reason` says why it missed or was cut short.
    """
    extra: dict[str, object] = {
        "cache": "hit" if outcome.hit else "miss",
        "key": outcome.key,
        "peer": outcome.peer,
        "registry": outcome.registry,
        "method": outcome.method,
        "bytes": outcome.bytes,
        "duration_ms": outcome.duration_ms,
        "attempts": outcome.attempts,
    }
    if outcome.hedged:
        extra["hedged"] = True
    if outcome.inflight:
        # the provider was still downloading it (cache="inflight"); not "source": the JSON log
        # formatter writes the code location under that name
        extra["provider_state"] = "inflight"
    if outcome.resumed_from:
        extra["resumed_from"] = list(outcome.resumed_from)
    if outcome.reason:
        extra["reason"] = outcome.reason
    if outcome.hit:
        logger.info("mirror hit", extra=extra)
    else:
        logger.info("mirror miss: %s", outcome.reason, extra=extra)


def _content_length(headers: tuple[tuple[str, str], ...]) -> int | None:
    for name, value in headers:
        if name.lower() == "content-length" and value.isdigit():
            return int(value)
    return None
