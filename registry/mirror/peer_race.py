"""Opening a peer response with hedging: race the start, not the body.

Why its own module: which peer is asked next (`registry.burst.supply`) and what one peer's answer
must look like (`registry.mirror.peer_transfer`) do not change with hedging; what changes is *when*
the next provider is asked.  `open_hedged` asks one provider; if it has not answered within the
hedge delay (`registry.mirror.hedging`), the next usable provider is asked too, up to `max_racers`
at once.  What counts as an answer is `open_one`'s to say: the mirror's
(`registry.mirror.peer_transfer`) returns once the response head *and* the body's first bytes are
here (kept for the body reader), so a peer that sends its head and then stalls is hedged like a
silent one.  The first useful answer wins; every other open attempt is cancelled by its cancel scope
(its connection closed), so a long transfer is never fetched twice: only the start is raced.  A
provider that fails fast (refused, 404, bad headers) is failed over at once, as without hedging, and
counts as a failed attempt; a cancelled loser does not.  Any other exception from an open (a peer
answer no check foresaw) is such a failure too: peer answers are untrusted input.

Several addresses of one peer (`Peer.more_hosts`): they are one provider here; its connect races
them (happy eyeballs, `registry.http.dial`), so a blackholed address costs one dial stagger.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Generic, TypeVar

import trio
from cachetools import TTLCache

from registry.burst.attempts import GiveUp, MirrorAttempts, peer_key
from registry.burst.supply import NoExtraPeer, Supply
from registry.http.client import PeerError
from registry.interfaces import Peer, PeerState
from registry.mirror.hedging import HedgeDelay
from registry.mirror.peer_answer import PeerAnswerError, PeerBusy

__all__ = ["Opened", "SlowPeers", "open_hedged"]

logger = logging.getLogger("registry.mirror.forwarder")

T = TypeVar("T")

FAILURES = (PeerError, PeerAnswerError, trio.TooSlowError)


@dataclass(frozen=True, slots=True)
class Opened(Generic[T]):
    """The winning open: its result and the stack that holds its connection (close it)."""

    peer: Peer
    result: T
    stack: AsyncExitStack
    hedged: bool  # more than one provider was asked at once


class SlowPeers:
    """Peers that lately lost a race they were asked first in (frozen, overloaded), for `ttl`
    seconds: a request that asks one of them first asks the next provider at once too, so a
    frozen provider costs one hedge delay per `ttl`, not one per request.  Bounded."""

    def __init__(self, ttl: float = 10.0, max_peers: int = 1024) -> None:
        self.ttl = ttl
        self._now = 0.0  # the caller's clock, as of the last call (the cache's timer reads it)
        self._slow: TTLCache[tuple[str, int], bool] = TTLCache(
            maxsize=max_peers, ttl=ttl, timer=lambda: self._now
        )

    def lost(self, peer: Peer, now: float) -> None:
        self._now = now
        self._slow[peer_key(peer)] = True

    def answered(self, peer: Peer) -> None:
        self._slow.pop(peer_key(peer), None)

    def is_slow(self, peer: Peer, now: float) -> bool:
        self._now = now
        return peer_key(peer) in self._slow


class _Race(Generic[T]):
    def __init__(self) -> None:
        self.winner: Opened[T] | None = None
        self.running = 0
        self.launched = 0
        self.hedges = 0  # providers asked beside a slow one (not fail-overs)
        self.give_up: GiveUp | None = None
        self.converged = False
        self.changed = trio.Event()
        self.peer_wait: trio.CancelScope | None = None

    def notify(self) -> None:
        self.changed.set()
        if self.peer_wait is not None:
            self.peer_wait.cancel()


async def open_hedged(
    supply: Supply,
    attempts: MirrorAttempts,
    *,
    delay: HedgeDelay,
    max_racers: int,
    open_one: Callable[[Peer, AsyncExitStack], Awaitable[T]],
    on_failure: Callable[[Peer, Exception], None],
    slow: SlowPeers | None = None,
) -> Opened[T] | GiveUp:
    """Open with the first provider that answers; GiveUp when attempts or providers ran out.

    `open_one(peer, stack)` opens and checks one response, entering its connection on `stack`;
    it raises PeerError, PeerAnswerError or trio.TooSlowError when that peer fails.  A busy
    peer (PeerBusy: at its upload limit) is reported to `on_failure` but uses up no attempt and
    may be asked again later (`on_failure` tells the supply).  Fail-overs come from
    `supply.next_peer` (the resolve clock, or a burst's claim/wait), hedges from
    `supply.extra_peer`.  Peers that lately lost a race they started first (`slow`) get company
    at once, not after the delay.
    """
    race: _Race[T] = _Race()
    slow = slow if slow is not None else SlowPeers()
    asked: list[Peer] = []  # in the order they were asked
    failed_peers: list[Peer] = []

    async def racer(peer: Peer, nursery: trio.Nursery) -> None:
        stack = AsyncExitStack()
        started = trio.current_time()
        try:
            try:
                result = await open_one(peer, stack)
            except FAILURES:
                raise
            except Exception as exc:
                # a peer's answer is untrusted input: one that no check foresaw fails this
                # peer, never the race (the good peers in it) nor the request
                logger.warning(
                    "peer answer could not be read",
                    extra={"peer": f"{peer.host}:{peer.port}", "error": repr(exc)[:200]},
                )
                raise PeerAnswerError(f"unreadable answer: {type(exc).__name__}") from exc
        except FAILURES as exc:
            with trio.CancelScope(shield=True):
                await stack.aclose()
            on_failure(peer, exc)
            failed_peers.append(peer)
            race.running -= 1
            if isinstance(exc, PeerBusy):
                attempts.tried.discard(peer_key(peer))  # not a failure: it may serve later
                race.notify()
                return
            give_up = attempts.fetch_failed()
            if give_up is not None:
                race.give_up = give_up
            race.notify()
            return
        except BaseException:  # lost the race (cancelled)
            with trio.CancelScope(shield=True):
                await stack.aclose()
            race.running -= 1
            # not a failed attempt, and not used up: it may still serve a resumption later
            attempts.tried.discard(peer_key(peer))
            supply.put_back(peer)
            raise
        race.running -= 1
        if race.winner is not None:  # answered in the same moment as the winner
            with trio.CancelScope(shield=True):
                await stack.aclose()
            return
        if peer.state is not PeerState.INFLIGHT:  # its first bytes may wait on its upstream
            delay.observe(trio.current_time() - started)
        race.winner = Opened(peer, result, stack, race.hedges > 0)
        now = trio.current_time()
        slow.answered(peer)
        for earlier in asked[: asked.index(peer)]:
            if earlier not in failed_peers:
                slow.lost(earlier, now)  # asked before the winner and still silent
        nursery.cancel_scope.cancel()

    def launch(peer: Peer, nursery: trio.Nursery) -> None:
        attempts.start_fetch(peer)
        asked.append(peer)
        race.running += 1
        race.launched += 1
        nursery.start_soon(racer, peer, nursery)

    result: GiveUp | None = None
    async with trio.open_nursery() as nursery:
        while True:
            race.changed = trio.Event()
            if race.running == 0:
                if race.give_up is not None:
                    result = race.give_up
                    break
                # nobody is being asked: the next provider, on the resolve clock (fail-over)
                peer = await supply.next_peer(attempts)
                if isinstance(peer, GiveUp):
                    result = peer
                    break
                launch(peer, nursery)
                continue
            if race.running >= max_racers or race.converged or race.give_up is not None:
                await race.changed.wait()
                continue
            running = [p for p in asked if p not in failed_peers]
            now = trio.current_time()
            wait = 0.0 if all(slow.is_slow(p, now) for p in running) else delay.current()
            with trio.move_on_after(wait):
                await race.changed.wait()
                continue
            # the hedge delay passed without an answer: ask the next provider too
            hedge = await _hedge_peer(supply, attempts, race)
            if hedge is NoExtraPeer.LATER:  # none known now: look again after another delay
                with trio.move_on_after(delay.current()):
                    await race.changed.wait()
                continue
            if hedge is NoExtraPeer.NEVER:
                race.converged = True
            elif hedge is not None:
                logger.info(
                    "peer slow to answer; hedging",
                    extra={
                        "peer": f"{hedge.host}:{hedge.port}",
                        "key": attempts.identifier,
                        "delay_ms": round(delay.current() * 1000, 1),
                    },
                )
                race.hedges += 1
                launch(hedge, nursery)
        nursery.cancel_scope.cancel()
    if race.winner is not None:
        return race.winner
    assert result is not None
    return result


async def _hedge_peer(
    supply: Supply, attempts: MirrorAttempts, race: _Race[T]
) -> Peer | NoExtraPeer | None:
    """The supply's extra provider, waiting as long as the race is unchanged (no resolve clock:
    a hedge is optional, so waiting for one uses up no attempt); None when the race changed."""
    with trio.CancelScope() as scope:
        race.peer_wait = scope
        try:
            return await supply.extra_peer(attempts)
        finally:
            race.peer_wait = None
    return None
