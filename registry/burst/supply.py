"""Provider supply for one mirror request: run the Router lookup, hand out usable peers in time.

Why its own module: where the next peer comes from (one lookup running beside the fetch, the
20 ms x retries resolve clock, skipping quarantined and stale peers) is one seam; what is done
with a peer once chosen (`registry.mirror.peer_transfer`) and whether its bytes are trusted
(`registry.mirror.verification`) are others.  Hedging (asking a second peer while the first is slow)
belongs here too: it is a question of supply.

A Router that can push a lookup's results (`WatchesProviders`) is watched rather than iterated:
its callbacks hand each provider to the waiting request directly, so no lookup task has to be
scheduled before the lookup starts nor between a reply and the request.  Other Routers keep the
task that iterates `resolve`.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import trio

from registry.burst.attempts import GiveUp, MirrorAttempts, peer_key
from registry.interfaces import Peer, Router
from registry.metrics import RESOLVE_DURATION

__all__ = [
    "BUSY_FIRST_RETRY",
    "NoExtraPeer",
    "PeerSupply",
    "RouterFailure",
    "Supply",
    "WatchesProviders",
    "next_usable_peer",
    "release_on_exit",
]

# A provider at its upload limit (429) is asked again after this, doubling with each busy answer
# the request got, never later than its Retry-After: an upload slot frees within milliseconds
# of a small blob's transfer, while Retry-After has whole seconds only.
BUSY_FIRST_RETRY = 0.1


class RouterFailure(Exception):
    """The Router's lookup itself failed (answered with 500, like Spegel)."""


@runtime_checkable
class KnowsProviders(Protocol):
    """A Router that can name providers it already knows, without a lookup or a wait."""

    def known_providers(self, key: str) -> list[Peer]: ...


class LookupHandle(Protocol):
    """A running watched lookup (`WatchesProviders.watch`)."""

    def cancel(self) -> None:
        """Stop it: no callback runs afterwards (idempotent, safe from inside a callback)."""
        ...


@runtime_checkable
class WatchesProviders(Protocol):
    """A Router whose lookups can push their results instead of being iterated (optional).

    `watch` starts a lookup of `key` and calls `found` for each provider and `done` once it has
    converged, synchronously from wherever the replies arrive; both may run before `watch`
    returns (providers already known, a Router that cannot ask anyone).  The callbacks must not
    block and their exceptions are the Router's to contain.  The caller `cancel`s the handle
    when it no longer wants results; a watch also ends by itself after `done`.
    """

    def watch(
        self, key: str, found: Callable[[Peer], None], done: Callable[[], None]
    ) -> LookupHandle: ...


async def release_on_exit(cancel: Callable[[], None]) -> None:
    """Call `cancel` when the nursery this runs in ends (a request's end, however it ends, ends
    its watch).  Not on any request's critical path."""
    try:
        await trio.sleep_forever()
    finally:
        cancel()


class NoExtraPeer(enum.Enum):
    """Why `Supply.extra_peer` has no provider to add."""

    LATER = "later"  # none known now: ask again after a while
    NEVER = "never"  # the lookup converged: none will come for this request


class Supply(Protocol):
    """Where one mirror request's providers come from; the request depends on this only.

    Two implementations: `PeerSupply` (one Router lookup on the resolve clock, as Spegel does)
    and `registry.burst.claim_supply.ClaimingSupply` (a burst's claim/wait decides who is asked).
    Every peer it hands out is one `attempts.usable` allows.
    """

    @property
    def multi_peer(self) -> bool:
        """Several providers may serve one blob at once (not when a claim decides who serves)."""
        ...

    def start(self, nursery: trio.Nursery) -> None:
        """Start looking for providers (its tasks run in `nursery`, cancelled at the end)."""
        ...

    async def next_peer(self, attempts: MirrorAttempts) -> Peer | GiveUp:
        """The next provider to fetch from (a fail-over), or GiveUp: answer 404."""
        ...

    async def extra_peer(self, attempts: MirrorAttempts) -> Peer | NoExtraPeer:
        """A provider to ask beside the ones already asked (a hedge, a multi-peer helper),
        waiting as long as the caller lets it."""
        ...

    def ready_peer(self, attempts: MirrorAttempts) -> Peer | None:
        """A provider that is already here, without waiting (give it back with `put_back`)."""
        ...

    def put_back(self, peer: Peer) -> None:
        """`peer` was asked but its answer was not needed: it may be handed out again."""
        ...

    def failed(self, peer: Peer) -> None:
        """`peer`'s fetch failed or its stream broke."""
        ...

    def busy(self, peer: Peer, retry_after: float) -> None:
        """`peer` answered busy (at its upload limit: not a failure)."""
        ...

    async def finish(self) -> None:
        """The request is over."""
        ...


@runtime_checkable
class KnowsReach(Protocol):
    """A Router that can say whether each of its lookups asks every node of the cluster."""

    def lookups_reach_all(self) -> bool: ...


class PeerSupply:
    """Runs one Router lookup and hands its providers out; None once it has converged.

    Providers the Router already knows (`KnowsProviders`) are handed out first, before the
    lookup task has even been scheduled: on a busy event loop that task may not run within the
    resolve deadline, and content a peer holds must not become a miss because of it.
    """

    multi_peer = True

    def __init__(self, router: Router, key: str, resolve_timeout: float = 0.020) -> None:
        self._router = router
        self._key = key
        self.resolve_timeout = resolve_timeout  # each wait for a provider in `next_peer`
        self._send, self._receive = trio.open_memory_channel[Peer](math.inf)
        self._returned: list[Peer] = []
        self.error: Exception | None = None
        self._seen: set[tuple[str, int]] = set()
        # providers that answered busy, with when to ask them again (at most one per provider)
        self._later: list[tuple[float, Peer]] = []
        self._busy_answers = 0
        if isinstance(router, KnowsProviders):
            for peer in router.known_providers(key):
                self._offer(peer)

    def _offer(self, peer: Peer) -> None:
        """Hand `peer` out unless it was already (each provider once per request)."""
        if peer_key(peer) not in self._seen:
            self._seen.add(peer_key(peer))
            self._send.send_nowait(peer)

    async def feed(self) -> None:
        started = time.monotonic()
        async with self._send:
            try:
                async with self._router.resolve(self._key) as peers:
                    async for peer in peers:
                        RESOLVE_DURATION.labels("dht").observe(time.monotonic() - started)
                        self._offer(peer)
            except Exception as exc:
                self.error = exc  # raised to the request by next(), not to the nursery

    # -- the `Supply` protocol ------------------------------------------------------------------

    def start(self, nursery: trio.Nursery) -> None:
        if isinstance(self._router, WatchesProviders):
            self._watch(self._router, nursery)
        else:
            nursery.start_soon(self.feed)

    def _watch(self, router: WatchesProviders, nursery: trio.Nursery) -> None:
        """`feed` without its task: the Router's callbacks fill the channel directly."""
        started = time.monotonic()

        def found(peer: Peer) -> None:
            try:
                RESOLVE_DURATION.labels("dht").observe(time.monotonic() - started)
                self._offer(peer)
            except Exception as exc:  # a bug here ends this lookup, not the Router's loop
                self._fail(exc)

        try:
            handle = router.watch(self._key, found, self._send.close)
        except Exception as exc:
            self._fail(exc)
            return
        nursery.start_soon(release_on_exit, handle.cancel)

    def _fail(self, exc: Exception) -> None:
        if self.error is None:
            self.error = exc  # raised to the request by next(), as feed's failures are
        self._send.close()

    async def next_peer(self, attempts: MirrorAttempts) -> Peer | GiveUp:
        return await next_usable_peer(self, attempts, self.resolve_timeout)

    async def extra_peer(self, attempts: MirrorAttempts) -> Peer | NoExtraPeer:
        """The next usable provider, however long the lookup takes; NEVER once it converged."""
        while (peer := await self.next()) is not None:
            if attempts.usable(peer):
                return peer
        return NoExtraPeer.NEVER

    def ready_peer(self, attempts: MirrorAttempts) -> Peer | None:
        """A usable provider that has already arrived (unusable ones on the way are dropped)."""
        while (peer := self.next_ready()) is not None:
            if attempts.usable(peer):
                return peer
        return None

    def failed(self, peer: Peer) -> None:
        """Nothing to do: `attempts` counts the failure, and the lookup goes on."""

    def busy(self, peer: Peer, retry_after: float) -> None:
        self.retry_later(peer, retry_after)

    async def finish(self) -> None:
        """Nothing to do: the lookup task ends with the request's nursery."""

    # -- the plain supply's own surface ----------------------------------------------------------

    def next_ready(self) -> Peer | None:
        """A provider that has already arrived, without waiting; None if there is none."""
        if self._returned:
            return self._returned.pop(0)
        try:
            return self._receive.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            return None

    def put_back(self, peer: Peer) -> None:
        """Hand `peer` out again (it was asked, but its answer was not needed: a hedge loser)."""
        self._returned.append(peer)

    def retry_later(self, peer: Peer, retry_after: float) -> None:
        """`peer` answered busy (at its upload limit, not a failure): hand it out again after a
        backoff (`BUSY_FIRST_RETRY`, doubling per busy answer, at most `retry_after`)."""
        delay = min(retry_after, BUSY_FIRST_RETRY * 2 ** min(self._busy_answers, 16))
        self._busy_answers += 1
        self._later = [(t, p) for t, p in self._later if peer_key(p) != peer_key(peer)]
        self._later.append((trio.current_time() + delay, peer))

    async def next_busy(self) -> Peer | None:
        """The provider that answered busy due again first, once it is due; None if none.
        Its wait is bounded by the request's overall deadline (a cancel scope around it)."""
        if not self._later:
            return None
        self._later.sort(key=lambda entry: entry[0])
        due, peer = self._later.pop(0)
        await trio.sleep_until(due)
        return peer

    async def next(self) -> Peer | None:
        """The next provider; None once the lookup converged; RouterFailure if it failed."""
        if self._returned:
            await trio.lowlevel.checkpoint()
            return self._returned.pop(0)
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            if self.error is not None:
                raise RouterFailure(f"router lookup failed: {self.error!r}") from self.error
            return None


async def next_usable_peer(
    supply: PeerSupply, attempts: MirrorAttempts, resolve_timeout: float
) -> Peer | GiveUp:
    """The next provider `attempts` allows, each wait bounded by `resolve_timeout`.  A provider
    that answered busy is waited for (`PeerSupply.next_busy`) rather than given up on: a full
    uploader is not a miss.  A usable provider already here (known to the Router, put back, or
    delivered) is handed out without a yield: the request's next step is its own I/O."""
    while (ready := supply.next_ready()) is not None:
        if attempts.usable(ready):
            return ready
    # consecutive waits share one clock (deadline n = start + n x timeout): no drift
    deadline = trio.current_time()
    while True:
        deadline += resolve_timeout
        converged = False
        with trio.move_on_at(deadline):
            while True:
                peer = await supply.next()
                if peer is None:
                    converged = True
                    break
                if attempts.usable(peer):
                    return peer
        if not converged:
            # the lookup may have delivered while this task waited to be scheduled: use it first
            while (ready := supply.next_ready()) is not None:
                if attempts.usable(ready):
                    return ready
        busy = await supply.next_busy()
        if busy is not None:
            deadline = trio.current_time()  # a fresh attempt's clock from here
            if attempts.usable(busy):
                return busy
            continue
        if converged:
            return attempts.converged()
        give_up = attempts.wait_timed_out()
        if give_up is not None:
            return give_up
