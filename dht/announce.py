"""When each of our own keys is next announced: a due-time heap with jitter, plus a paced queue.

Why: a node may hold thousands of keys. Announcing them all at once would be a burst of 20 x N
datagrams; instead keys wait in a FIFO and only a few announce jobs run at a time, and refresh times
are jittered so the keys advertised together drift apart instead of re-announcing in lockstep.
Each key carries the state it is advertised with (`RecordState`); in-flight and claim records live
shorter than complete ones, so they are refreshed more often (`refresh_by_state`).
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Mapping

from dht.ids import RecordState


class AnnounceSchedule:
    def __init__(
        self,
        refresh: float,
        rng: random.Random,
        jitter: float = 0.1,
        refresh_by_state: Mapping[RecordState, float] | None = None,
    ) -> None:
        self.refresh = refresh
        self.refresh_by_state = dict(refresh_by_state or {})
        self.jitter = jitter
        self._rng = rng
        self._keys: dict[bytes, str] = {}  # key id -> key string
        self._states: dict[bytes, RecordState] = {}  # only keys not advertised as COMPLETE
        self._due: list[tuple[float, bytes]] = []  # lazy heap
        self._when: dict[bytes, float] = {}
        self._queue: deque[bytes] = deque()
        self._queued: set[bytes] = set()

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, kid: bytes) -> bool:
        return kid in self._keys

    def key(self, kid: bytes) -> str | None:
        return self._keys.get(kid)

    def state(self, kid: bytes) -> RecordState:
        return self._states.get(kid, RecordState.COMPLETE)

    def add(self, kid: bytes, key: str, state: RecordState = RecordState.COMPLETE) -> bool:
        """Advertise `kid` with `state`: queued for announcing now if new or its state changed.

        False if it was already advertised with that state (nothing to do).
        """
        if kid in self._keys and self.state(kid) is state:
            return False
        self._keys[kid] = key
        if state is RecordState.COMPLETE:
            self._states.pop(kid, None)
        else:
            self._states[kid] = state
        self._when.pop(kid, None)  # the pending refresh, if any, is superseded
        # a claim or a download in progress matters for the next few seconds only (a burst's
        # nodes decide on it): it goes ahead of the keys waiting for their first announce
        self._enqueue(kid, urgent=state is not RecordState.COMPLETE)
        return True

    def remove(self, kid: bytes) -> bool:
        if self._keys.pop(kid, None) is None:
            return False
        self._states.pop(kid, None)
        self._when.pop(kid, None)
        self._queued.discard(kid)
        return True

    def _enqueue(self, kid: bytes, urgent: bool = False) -> None:
        if kid in self._queued and urgent:
            self._queue.remove(kid)  # rare (a state change of a key still queued): O(queue)
            self._queued.discard(kid)
        if kid not in self._queued:
            self._queued.add(kid)
            if urgent:
                self._queue.appendleft(kid)
            else:
                self._queue.append(kid)

    def reschedule(self, kid: bytes, now: float, delay: float | None = None) -> None:
        """Announce `kid` again after `delay` (default: `refresh`, minus up to `jitter` of it)."""
        if kid not in self._keys:
            return
        if delay is None:
            refresh = self.refresh_by_state.get(self.state(kid), self.refresh)
            delay = refresh * (1.0 - self.jitter * self._rng.random())
        when = now + delay
        self._when[kid] = when
        heapq.heappush(self._due, (when, kid))

    def release_due(self, now: float) -> None:
        """Move every key whose refresh time has come into the queue."""
        while self._due and self._due[0][0] <= now:
            when, kid = heapq.heappop(self._due)
            if self._when.get(kid) == when:
                del self._when[kid]
                self._enqueue(kid)

    def next_due(self) -> float | None:
        while self._due and self._when.get(self._due[0][1]) != self._due[0][0]:
            heapq.heappop(self._due)
        return self._due[0][0] if self._due else None

    def pop_queued(self) -> bytes | None:
        while self._queue:
            kid = self._queue.popleft()
            if kid in self._queued:
                self._queued.discard(kid)
                return kid
        return None

    def queued(self) -> int:
        return len(self._queued)
