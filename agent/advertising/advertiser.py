"""One voice towards the Router: merges what the state tracker, the ingest watcher and claims say.

Why: three parts of the agent have an opinion on a digest.  The state tracker advertises what
containerd's images hold (COMPLETE); the ingest watcher says a download is in progress
(INFLIGHT), or has just been committed (COMPLETE, before containerd 1.6 tells the tracker anything:
its image record appears only when the whole pull is done); a claim says this node is about to
fetch a digest (CLAIM).  If each called the Router on its own, a tracker withdraw could erase an
in-flight record or an aborted download withdraw a key an image holds.  `KeyStates` (pure) keeps
each source's set and yields the effective state per key, best first: COMPLETE (tracker, or
committed within `committed_grace`) over INFLIGHT over CLAIM; `KeyAdvertiser` tells the Router
only when a key's effective state changes.

Publishing is a group commit: changes queue in the order they were decided, and the one caller
publishing at a time hands every queued change to the Router (each key at its latest state) in
one go.  So a burst of claims costs the Router a few calls instead of one scheduler pass per
queued caller, and a caller cancelled while it waits (a claim bounded by the resolve budget)
still has its change published by the next caller that drains the queue.  An uncontended claim
takes no lock: its only yield is the Router's, so the settle window starts one pass sooner.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager

import trio
from prometheus_client import Gauge

from agent.containerd.ingest import IngestChange, IngestRestarted, IngestStarted, IngestVanished
from registry.interfaces import Peer, PeerState, Router

logger = logging.getLogger(__name__)

# a Prometheus metric: process-wide by design, registered once at import (agent.advertising.state)
INFLIGHT_INGESTS = Gauge(
    "spegla_inflight_ingests",
    "Blobs this node's containerd is downloading right now, advertised as in progress.",
)

Change = tuple[str, PeerState | None]  # key, new effective state (None: withdrawn)


class KeyStates:
    """Each source's keys and the resulting effective state per key (no I/O; `now` is given)."""

    def __init__(self, committed_grace: float = 900.0) -> None:
        self.committed_grace = committed_grace
        self.tracked: set[str] = set()
        self.committed: dict[str, float] = {}  # digest -> until when it counts as complete
        self.inflight: set[str] = set()
        self.claims: set[str] = set()

    def state(self, key: str) -> PeerState | None:
        if key in self.tracked or key in self.committed:
            return PeerState.COMPLETE
        if key in self.inflight:
            return PeerState.INFLIGHT
        if key in self.claims:
            return PeerState.CLAIM
        return None

    def _before(self, keys: Iterable[str]) -> dict[str, PeerState | None]:
        return {key: self.state(key) for key in keys}

    def _changes(self, before: dict[str, PeerState | None]) -> list[Change]:
        return [(k, now) for k, old in before.items() if (now := self.state(k)) is not old]

    def track(self, keys: Iterable[str]) -> list[Change]:
        before = self._before(keys)
        self.tracked.update(before)
        for key in before:  # the tracker speaks for it from now on (a delete withdraws it)
            self.committed.pop(key, None)
        self.claims.difference_update(before)  # held now: a claim would outlive a delete
        return self._changes(before)

    def untrack(self, keys: Iterable[str]) -> list[Change]:
        before = self._before(keys)
        self.tracked.difference_update(before)
        return self._changes(before)

    def start(self, digest: str) -> list[Change]:
        before = self._before([digest])
        self.inflight.add(digest)
        self.claims.discard(digest)  # the download the claim announced has begun
        return self._changes(before)

    def finish(self, digest: str, committed: bool, now: float) -> list[Change]:
        before = self._before([digest])
        self.inflight.discard(digest)
        if committed:
            self.committed[digest] = now + self.committed_grace
        return self._changes(before)

    def claim(self, digest: str) -> list[Change]:
        """A claim on a digest this node has nothing of; never hides (or outlives) a better
        record: it ends when the download starts or the digest is held."""
        before = self._before([digest])
        if before[digest] is None:
            self.claims.add(digest)
        return self._changes(before)

    def unclaim(self, digest: str) -> list[Change]:
        before = self._before([digest])
        self.claims.discard(digest)
        return self._changes(before)

    def expire(self, now: float) -> list[Change]:
        """Committed digests the tracker never took over (the pull failed later) stop counting."""
        before = self._before(d for d, until in self.committed.items() if until <= now)
        for digest in before:
            del self.committed[digest]
        return self._changes(before)


class KeyAdvertiser:
    """Tells `router` each key's effective state; hands the tracker a Router of its own."""

    def __init__(self, router: Router, *, committed_grace: float = 900.0) -> None:
        self._router = router
        self.states = KeyStates(committed_grace)
        self._queue: dict[str, PeerState | None] = {}  # decided, not yet handed to the Router
        self._publishing = False  # a caller is handing a batch to the Router
        self._turns = trio.lowlevel.ParkingLot()  # callers waiting for that to end
        self._taken = 0  # batches taken from the queue so far
        self._handed = 0  # of those, how many have been handed over (or failed)

    def tracker_router(self) -> Router:
        """The Router the state tracker talks to: its keys are the COMPLETE source."""
        return _TrackerRouter(self)

    def state(self, key: str) -> PeerState | None:
        return self.states.state(key)

    async def _publish(self, changes: list[Change]) -> None:
        INFLIGHT_INGESTS.set(len(self.states.inflight))
        if not changes:
            return
        for key, state in changes:
            self._queue.pop(key, None)  # re-inserted: the queue stays in decision order
            self._queue[key] = state
        # invariant: a change is in the queue until a publisher has taken it, and the publisher
        # hands what it took to the Router shielded (nothing taken is ever dropped); one
        # publisher at a time, so batches reach the Router in the order they were taken.  A
        # caller returns once the batch holding its change was handed over.  Uncontended, the
        # caller publishes at once: no yield besides the Router's own.
        mine = self._taken + 1  # the batch that will take these changes
        while self._publishing:
            await self._turns.park()  # cancellable: the change stays queued for the next one
            if self._handed >= mine:
                return  # an earlier publisher handed ours over with its batch
        if not self._queue:
            return  # taken by a batch whose hand-off failed (its publisher raised)
        self._publishing = True
        batch, self._queue = self._queue, {}
        self._taken += 1
        try:
            by_state: dict[PeerState | None, list[str]] = {}
            for key, state in batch.items():
                by_state.setdefault(state, []).append(key)
            with trio.CancelScope(shield=True):
                for state, keys in by_state.items():
                    if state is not None:
                        await self._router.advertise(keys, state)
                withdrawn = by_state.get(None)
                if withdrawn:
                    await self._router.withdraw(withdrawn)
        finally:
            self._handed = self._taken
            self._publishing = False
            self._turns.unpark_all()

    async def on_ingest(self, change: IngestChange, committed: bool) -> None:
        """The ingest watcher's callback."""
        digest = change.entry.digest
        if isinstance(change, IngestStarted | IngestRestarted):
            logger.info(
                "download in progress",
                extra={"key": digest, "total": change.entry.total, "ref": change.entry.ref},
            )
            await self._publish(self.states.start(digest))
        elif isinstance(change, IngestVanished):
            logger.info(
                "download committed" if committed else "download aborted",
                extra={"key": digest, "total": change.entry.total},
            )
            await self._publish(self.states.finish(digest, committed, trio.current_time()))

    async def claim(self, digest: str) -> None:
        """Advertise that this node is about to fetch `digest` (unless it has it or gets it)."""
        await self._publish(self.states.claim(digest))

    async def unclaim(self, digest: str) -> None:
        await self._publish(self.states.unclaim(digest))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Expire committed digests the tracker never took over (checked once a minute)."""
        task_status.started()
        while True:
            await trio.sleep(60.0)
            await self._publish(self.states.expire(trio.current_time()))


class _TrackerRouter:
    def __init__(self, owner: KeyAdvertiser) -> None:
        self._owner = owner

    def ready(self) -> bool:
        return self._owner._router.ready()

    async def advertise(self, keys: Iterable[str], state: PeerState = PeerState.COMPLETE) -> None:
        await self._owner._publish(self._owner.states.track(keys))

    async def withdraw(self, keys: Iterable[str]) -> None:
        await self._owner._publish(self._owner.states.untrack(keys))

    def resolve(self, key: str) -> AbstractAsyncContextManager[AsyncIterator[Peer]]:
        return self._owner._router.resolve(key)
