"""Mirror events: what the mirror path reports as it works, for whoever watches it.

Why explicit events: the debug page (and anything else that wants per-request mirror results)
subscribes to typed records the forwarder emits, instead of reading log records and guessing at
their field names; logging stays free to change and needs no particular level.

Contract: `MirrorEvents.emit` calls each observer synchronously, in subscription order, in the
emitting task.  An observer must not block or await: one that needs a task hands the event on
with `send_nowait` on a bounded memory channel and drops it when full.  An observer that raises
is logged and stays subscribed; the mirror request is never affected.  New kinds of event are new
frozen dataclasses added to the `MirrorEvent` union; observers ignore kinds they do not know.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "MirrorEvent",
    "MirrorEvents",
    "MirrorObserver",
    "MirrorOutcome",
    "PeerFetchFailed",
    "PeerQuarantined",
    "TransferProgress",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MirrorOutcome:
    """One per mirror request, at its end (the same facts as its INFO "mirror hit/miss" line)."""

    at: float  # unix time of the end
    key: str  # digest or registry/repo:tag
    registry: str
    method: str  # "GET" or "HEAD"
    hit: bool  # a response head from a peer went out
    peer: str | None  # host:port whose answer was sent (hits only)
    resumed_from: tuple[str, ...]  # host:port of peers a broken stream continued from
    bytes: int  # body bytes handed to the response
    duration_ms: float
    attempts: int  # peers asked
    reason: str  # why it missed or was cut short; "" for a clean hit
    hedged: bool = False  # a second provider was asked while the first was slow to answer
    inflight: bool = False  # the answering provider was still downloading it (an in-flight record)


@dataclass(frozen=True, slots=True)
class PeerFetchFailed:
    """One peer did not give a usable answer (the request fails over to the next)."""

    at: float
    key: str
    peer: str  # host:port
    error: str


@dataclass(frozen=True, slots=True)
class PeerQuarantined:
    """A peer served bytes not matching `digest`; it is not asked for that digest again."""

    at: float
    digest: str
    peer: str  # host:port
    registry: str


@dataclass(frozen=True, slots=True)
class TransferProgress:
    """A body moving between this node and a peer: once when it starts, at most every
    `PROGRESS_INTERVAL` seconds while it runs, and once at its end (`state` done or failed)."""

    at: float
    id: str  # the same for every report of one transfer
    key: str
    peer: str  # host:port
    bytes: int  # body bytes so far
    total: int | None  # body size when known
    state: str  # "running" | "done" | "failed"
    direction: str = "in"  # "in": fetched from the peer; "out": served to it
    source: str = "complete"  # the provider's record state ("complete" | "inflight")


PROGRESS_INTERVAL = 0.25

MirrorEvent = MirrorOutcome | PeerFetchFailed | PeerQuarantined | TransferProgress
MirrorObserver = Callable[[MirrorEvent], None]


class MirrorEvents:
    """Fans mirror events out to observers (see the module docstring for the contract)."""

    def __init__(self) -> None:
        self._observers: list[MirrorObserver] = []

    def subscribe(self, observer: MirrorObserver) -> Callable[[], None]:
        """Add `observer`; returns the function that removes it again."""
        self._observers.append(observer)

        def unsubscribe() -> None:
            if observer in self._observers:
                self._observers.remove(observer)

        return unsubscribe

    def emit(self, event: MirrorEvent) -> None:
        for observer in list(self._observers):
            try:
                observer(event)
            except Exception:
                name = type(event).__name__
                logger.exception("mirror event observer failed", extra={"event": name})
