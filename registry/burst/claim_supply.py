"""The Trio driver of the claim protocol: one blob mirror request's way to a provider or a 404.

Why its own module: `registry.burst.claim.ProviderWait` decides (claim, wait, which provider); this
performs its steps: lookups through the Router (restarted when it asks for a fresh one), claim
records through the agent's `ClaimBoard`, waits as Trio deadlines.  The mirror run asks it for the
next peer and reports fetch failures and busy answers back.

A claimant's claim outlives its request (its containerd goes upstream after our 404 and the ingest
then turns the record into an in-flight one): it is withdrawn `claim_wait` later by a task in the
registry's task nursery (`ClaimParticipation.background`, owned by `Registry.run`), or inline when
there is none (tests).

A Router that pushes lookup results (`registry.burst.supply.WatchesProviders`) is watched: its
callbacks feed the `ProviderWait` and wake the request directly, and a restarted lookup is a new
watch (the old one cancelled), with no task spawned per lookup.  Each watch's callbacks check
that it is still the current one, so a replaced lookup's late replies change nothing."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
from cachetools import TTLCache

from registry.burst.attempts import GiveUp, MirrorAttempts, PeerKey, peer_key
from registry.burst.claim import (
    ClaimSettings,
    Fetch,
    Miss,
    ProviderWait,
    PublishClaim,
    Resolve,
    Wait,
    WithdrawClaim,
)
from registry.burst.provider_choice import BusyPeers, RecordState, Sighting
from registry.burst.supply import (
    BUSY_FIRST_RETRY,
    KnowsProviders,
    KnowsReach,
    LookupHandle,
    NoExtraPeer,
    RouterFailure,
    WatchesProviders,
    release_on_exit,
)
from registry.interfaces import ClaimBoard, Peer, PeerState, Router
from registry.metrics import CLAIM_OUTCOMES, CLAIM_WAIT

__all__ = ["ClaimParticipation", "ClaimingSupply", "DistrustedClaims"]

logger = logging.getLogger(__name__)

HOLD_CHECK = 0.25  # while a claim is held, how often to look whether containerd is still there

_STATES = {
    PeerState.COMPLETE: RecordState.COMPLETE,
    PeerState.INFLIGHT: RecordState.INFLIGHT,
    PeerState.CLAIM: RecordState.CLAIM,
}


class DistrustedClaims:
    """Claimants that let a waiter down for a key (no download appeared), skipped for `ttl`."""

    def __init__(self, ttl: float = 60.0, max_entries: int = 4096) -> None:
        self._now = 0.0  # the caller's clock, as of the last call (the cache's timer reads it)
        self._entries: TTLCache[tuple[str, bytes], bool] = TTLCache(
            maxsize=max_entries, ttl=ttl, timer=lambda: self._now
        )

    def add(self, key: str, node_id: bytes, now: float) -> None:
        self._now = now
        self._entries[(key, node_id)] = True

    def nodes(self, key: str, now: float) -> frozenset[bytes]:
        self._now = now
        self._entries.expire()
        return frozenset(n for (k, n) in self._entries if k == key)


@dataclass(slots=True)
class ClaimParticipation:
    """What the forwarder needs to take part in claims (the agent builds it)."""

    board: ClaimBoard
    node_id: bytes  # this node's DHT id (the one in its provider records)
    own_hosts: frozenset[str] = frozenset()  # this node's addresses (besides loopback)
    background: trio.Nursery | None = None  # where claim holds run (`Registry.run`'s nursery)
    busy: BusyPeers = field(default_factory=BusyPeers)
    distrusted: DistrustedClaims = field(default_factory=DistrustedClaims)
    # is this node's containerd still there to fetch what it claimed? (the agent's connection
    # to it; None: assume so).  A claim held for a containerd that died is withdrawn at once,
    # so the waiters claim again instead of waiting out `ingest_wait` for a download that
    # will not start.
    containerd_up: Callable[[], bool] | None = None

    def local_client(self, ip: str | None) -> bool:
        """Requests from this node's containerd may claim; others (via a Service) may not."""
        if ip is None or ip in self.own_hosts:
            return True
        try:
            return ipaddress.ip_address(ip).is_loopback
        except ValueError:
            return False

    async def hold_then_unclaim(self, digest: str, hold: float) -> None:
        deadline = trio.current_time() + hold
        while (left := deadline - trio.current_time()) > 0:
            await trio.sleep(min(left, HOLD_CHECK))
            if self.containerd_up is not None and not self.containerd_up():
                logger.info("containerd is gone: claim withdrawn", extra={"key": digest})
                break
        with trio.CancelScope(shield=True), trio.move_on_after(2.0):
            await self.board.unclaim(digest)


class ClaimingSupply:
    """Runs one `ProviderWait` for a blob digest; `next_peer` returns a provider or a GiveUp.

    A `registry.burst.supply.Supply`: the claim/wait decides who is asked, so one provider serves
    at a time (`multi_peer` is false) and hedges come only from complete providers already seen.
    """

    multi_peer = False

    def __init__(
        self,
        router: Router,
        claims: ClaimParticipation,
        settings: ClaimSettings,
        digest: str,
        avoid: frozenset[PeerKey],
        nursery: trio.Nursery,
        client_ip: str | None,
    ) -> None:
        now = trio.current_time()
        self._router = router
        self._claims = claims
        self._settings = settings
        self._digest = digest
        self._nursery = nursery
        ignored = claims.distrusted.nodes(digest, now)
        self._client_host = None if claims.local_client(client_ip) else client_ip
        self.wait = ProviderWait(
            claims.node_id,
            digest,
            now,
            settings,
            claims_enabled=self._client_host is None,
            avoid=avoid,
            distrusted_claims=ignored,
            busy_peers=claims.busy,
            lookups_reach_all=isinstance(router, KnowsReach) and router.lookups_reach_all(),
        )
        self._peers: dict[PeerKey, Peer] = {}
        self._changed = trio.Event()
        self._lookup: trio.CancelScope | None = None  # the lookup task's (Routers that do not push)
        self._watch: LookupHandle | None = None  # the current watched lookup (Routers that push)
        self._round = 0  # which lookup is current: a replaced watch's callbacks check it
        self._looked = False  # the first lookup was started
        self._holding = False  # a task cancels the current watch when the nursery ends
        self._error: Exception | None = None
        self._claimed = False  # our claim record is out
        self.claimant = False  # this request ended as the claimant
        self._reported = False
        self._last: Peer | None = None  # the provider the last Fetch handed out
        self._busy_answers = 0

    # -- lookups -----------------------------------------------------------------------------------

    def _start_lookup(self) -> None:
        self._stop_lookup()
        if isinstance(self._router, WatchesProviders):
            self._start_watch(self._router)
            return
        scope = self._lookup = trio.CancelScope()
        self._nursery.start_soon(self._run_lookup, scope)

    def _stop_lookup(self) -> None:
        self._round += 1  # whatever the previous lookup still reports is ignored
        if self._lookup is not None:
            self._lookup.cancel()
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def _start_watch(self, router: WatchesProviders) -> None:
        """The lookup as callbacks from the Router (see the module doc): no task, no hop."""
        current = self._round

        def found(peer: Peer) -> None:
            if current == self._round:
                try:
                    self._seen(peer)
                except Exception as exc:  # a bug here fails this request, not the Router
                    self._failed_lookup(exc)

        def done() -> None:
            if current == self._round:
                self.wait.round_ended(trio.current_time())
                self._changed.set()

        try:
            handle = router.watch(self._digest, found, done)
        except Exception as exc:
            self._failed_lookup(exc)
            return
        if current != self._round:  # a callback failed the lookup while it started
            handle.cancel()
            return
        self._watch = handle
        if not self._holding:  # one task per request, not per lookup, off the critical path
            self._holding = True
            self._nursery.start_soon(release_on_exit, self._stop_lookup)

    def _failed_lookup(self, exc: Exception) -> None:
        self._error = exc
        self._round += 1
        self._changed.set()

    def _seen(self, peer: Peer) -> None:
        if self._client_host is not None and peer.host == self._client_host:
            return  # the asking node's own records (its claim, its ingest)
        self._peers[peer_key(peer)] = peer
        self.wait.seen(Sighting(peer.node_id, peer_key(peer), _STATES[peer.state]))
        self._changed.set()

    def _seed_known(self) -> None:
        """Providers the Router knows without a lookup count as seen at once: on a busy event
        loop the lookup task may not run within the resolve deadline (see peer_supply)."""
        if isinstance(self._router, KnowsProviders):
            for peer in self._router.known_providers(self._digest):
                self._seen(peer)

    async def _run_lookup(self, scope: trio.CancelScope) -> None:
        with scope:
            try:
                async with self._router.resolve(self._digest) as peers:
                    async for peer in peers:
                        self._seen(peer)
            except Exception as exc:
                self._error = exc
            if scope is self._lookup:
                self.wait.round_ended(trio.current_time())
                self._changed.set()

    # -- the request's side ------------------------------------------------------------------------

    async def next_peer(self, attempts: MirrorAttempts) -> Peer | GiveUp:
        """The next provider to fetch from, or GiveUp (answer 404)."""
        if not self._looked:
            self._looked = True
            self._seed_known()
            self._start_lookup()
        if self.wait.decided:  # asked again after a miss (a resumption): the answer stands
            return GiveUp(self.wait.reason, attempts.failed)
        if self.wait.fetching and self._last is not None:
            # asked again without hearing how the last fetch ended (a lying peer's whole body
            # was thrown away, a stream broke on a path that does not report): it failed
            self.failed(self._last)
        while True:
            if self._error is not None:
                raise RouterFailure(f"router lookup failed: {self._error!r}") from self._error
            self._changed = trio.Event()
            now = trio.current_time()
            step = self.wait.step(now)
            if isinstance(step, Fetch):
                peer = self._peers[step.sighting.address]
                if step.withdraw_claim:
                    await self._unclaim()
                if not attempts.usable(peer):
                    # tried or avoided by the mirror run's own rules: not a source for us
                    self.wait.exclude(step.sighting.address, now)
                    continue
                self._outcome("fetch")
                self._last = peer
                return peer
            if isinstance(step, Wait):
                with trio.move_on_at(step.until):
                    await self._changed.wait()
            elif isinstance(step, Resolve):
                self._start_lookup()
            elif isinstance(step, PublishClaim):
                await self._claim()
            elif isinstance(step, WithdrawClaim):
                await self._unclaim()
            elif isinstance(step, Miss):
                return self._missed(step, attempts)

    def _missed(self, step: Miss, attempts: MirrorAttempts) -> GiveUp:
        self._stop_lookup()
        if step.claimant:
            self.claimant = True
            self._outcome("claimant")
        elif step.waited_on is not None:
            self._outcome("wait_timeout")
            self._claims.distrusted.add(self._digest, step.waited_on, trio.current_time())
        else:
            self._outcome("miss")
        logger.debug(
            "claim outcome",
            extra={
                "key": self._digest,
                "reason": step.reason,
                "claims_seen": [n.hex()[:8] for n in self.wait.claims],
                "sources_seen": len(self.wait.sources),
                "first_lookup_ms": round((self.wait.first_lookup or 0) * 1000, 1),
                "settle_ms": round(self.wait.settle * 1000, 1),
                "waited_ms": round((trio.current_time() - self.wait.started) * 1000, 1),
            },
        )
        return GiveUp(step.reason, attempts.failed)

    def _outcome(self, outcome: str) -> None:
        CLAIM_OUTCOMES.labels(outcome).inc()
        if not self._reported:  # the first way out of this request's wait (not resumptions)
            self._reported = True
            CLAIM_WAIT.labels(outcome).observe(trio.current_time() - self.wait.started)

    def failed(self, peer: Peer) -> None:
        if self.wait.fetching:
            self.wait.exclude(peer_key(peer), trio.current_time())

    def spare_peer(self, attempts: MirrorAttempts) -> Peer | None:
        """A complete provider already seen that `attempts` allows, to hedge a slow fetch with
        (`registry.mirror.peer_race`); no claim or wait step is taken for it.  None if there is
        none."""
        now = trio.current_time()
        for key, peer in self._peers.items():
            if (
                peer.state is PeerState.COMPLETE
                and attempts.usable(peer)
                and not self._claims.busy.busy(key, now)
            ):
                return peer
        return None

    def start(self, nursery: trio.Nursery) -> None:
        """Nothing to start: the first `next_peer` starts its lookup (in the nursery given)."""

    async def extra_peer(self, attempts: MirrorAttempts) -> Peer | NoExtraPeer:
        """`spare_peer`, without waiting (no claim or wait step is taken for a hedge)."""
        peer = self.spare_peer(attempts)
        return NoExtraPeer.LATER if peer is None else peer

    def ready_peer(self, attempts: MirrorAttempts) -> Peer | None:
        """None: a claim's decision hands out one provider at a time."""
        return None

    def put_back(self, peer: Peer) -> None:
        """Nothing to do: `spare_peer` hands out any complete provider seen that is usable."""

    def busy(self, peer: Peer, retry_after: float) -> None:
        if not self.wait.fetching:
            return
        now = trio.current_time()
        # asked again after a backoff, as in the plain path (registry.burst.supply)
        backoff = BUSY_FIRST_RETRY * 2 ** min(self._busy_answers, 16)
        self._busy_answers += 1
        self.wait.busy(peer_key(peer), now + max(0.0, min(retry_after, backoff, 10.0)), now)

    async def _claim(self) -> None:
        # awaited (ordered with a later unclaim) and shielded: a record half-sent when the
        # request ends would outlive the withdraw
        self._claimed = True
        with trio.CancelScope(shield=True), trio.move_on_after(self._settings.budget):
            await self._claims.board.claim(self._digest)

    async def _unclaim(self) -> None:
        if self._claimed:
            self._claimed = False
            with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                await self._claims.board.unclaim(self._digest)

    async def finish(self) -> None:
        """End of the request: a claimant's claim is held for `ingest_wait`, others withdrawn."""
        self._stop_lookup()
        if not self._reported:  # ended before the wait decided: the deadline (or the client)
            self._outcome("deadline")
        if not self._claimed:
            return
        if not self.claimant:
            await self._unclaim()
            return
        self._claimed = False
        hold = self._settings.ingest_wait
        if self._claims.background is not None:
            self._claims.background.start_soon(self._claims.hold_then_unclaim, self._digest, hold)
        else:
            await self._claims.hold_then_unclaim(self._digest, hold)
