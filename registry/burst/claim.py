"""From a blob miss to a provider, a claim or a 404: the claim protocol as a pure state machine.

Why: when many nodes miss the same layer at once, at most one of them should let its containerd go
upstream (the *claimant*); the others wait for the claimant's ingest to show up as an inflight
provider and stream from it.  The rules live here, without I/O or clocks, so the agent's mirror
(`registry.mirror.forwarder`) and the rollout simulator (`bench.rollout`) run the same decisions.

One `ProviderWait` serves one mirror request.  The driver calls `step(now)` and performs what it
returns, feeding back lookup results (`seen`, `round_ended`) and fetch outcomes (`exclude`, `busy`):

  LOOKING   the first resolve attempt (`resolve_timeout`, 20 ms).  A source (complete or inflight)
            -> `Fetch`.  Nothing by the end of the attempt (or the lookup converged):
            - someone else's claim seen          -> WAITING for it;
            - sources seen but all busy          -> WAITING for one to free up;
            - nothing usable (none seen, or all failed: a tree that lost its root)
                                                 -> `PublishClaim`, then SETTLING.
  SETTLING  `settle` after our claim went out, a fresh lookup (`Resolve`) shows the claims made at
            about the same moment.  Decided when that lookup converges, and never later than the
            resolve budget (`resolve_timeout` x `resolve_retries`, the 60 ms a plain miss takes)
            or, when the first lookup took longer than `settle`, the settle window stretched
            to what a claim needs to be seen (`settle_for`, at most 250 ms, below):
            the claimant is the claim of lowest `claim_rank` (a hash of node id and key, so the
            layers of one image get different claimants and no node uploads every layer first)
            among the claims seen (ours included).  Every node that sees a set of claims
            containing the overall lowest one agrees on it, and the lowest claimant always sees
            its own claim, so there is always at least one claimant;
            two only when a claim is not visible to the other within `settle` (then: one extra
            upstream copy, never a deadlock).  Winner -> `Miss(claimant=True)`: its containerd
            goes upstream, its ingest appears and becomes the inflight provider.  Loser ->
            `WithdrawClaim`, then WAITING.
            A late claim (ours went out `settle` or more after our lookup began, e.g. at the end
            of an attempt that did not converge) may have been invisible to a claimant whose
            settle lookup asked us before it went out: that claimant may already have decided
            without it.  So a late claim that would win against other claims confirms first:
            it keeps its claim and looks again every `poll` until `settle_max` + the resolve
            budget have passed (by then every claim made about when ours was is decided).
            The others gone (they saw ours and deferred) -> winner; a source -> `Fetch`; one
            still standing at the end (it won without seeing ours) -> `WithdrawClaim`, WAITING
            for it.  Our claim stays out while confirming, so a claimant still settling sees it
            and defers: two late claims never both withdraw.
  WAITING   re-resolve every `poll` until a source appears (-> `Fetch`) or `ingest_wait` has
            passed since the request began (-> `Miss`: its containerd goes upstream as today).  A
            lookup that converges with neither a claim nor a source means the claimant gave up:
            `Miss` at once.
A source appearing in any phase wins (`Fetch`; a claim of ours stays until the request ends).
Every path ends by a deadline, so the protocol never waits unbounded and cannot deadlock.

How long a claim needs to be seen (the settle window).  Two nodes A and B miss together; B's first
lookup asked A before A's claim was out, so B claimed too.  A must look again late enough to see
B's claim.  Where a lookup asks every node of the cluster (`lookups_reach_all`: this node knows
fewer than the DHT's k contacts, so every lookup converges only after asking each of them), B's
claim is in B's own store, and so visible to A's next lookup, as soon as B published it: at most
one first attempt of B's (its lookup, bounded by `resolve_timeout`, plus B's scheduling delay)
after B's lookup asked A.  One first lookup of ours (the same work, on a node as loaded) covers
that.  Elsewhere a claim is seen only once B's announce reached the key's storers (a lookup plus
a store): the window is three first lookups.  Under saturation the first lookup is mostly this
node's own scheduling delay; stretching by one lookup instead of three is what keeps a miss
within a few times a local GET there.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field

from registry.burst.provider_choice import (
    BusyPeers,
    PeerKey,
    Sighting,
    rank_providers,
)

__all__ = [
    "ClaimSettings",
    "Fetch",
    "Miss",
    "ProviderWait",
    "PublishClaim",
    "Resolve",
    "Step",
    "Wait",
    "WithdrawClaim",
    "claim_rank",
]


def claim_rank(node_id: bytes, key: str) -> bytes:
    """The tie-break between simultaneous claims of `key`: the lowest rank wins."""
    return hashlib.sha256(node_id + b"\x00claim\x00" + key.encode()).digest()


@dataclass(frozen=True, slots=True)
class ClaimSettings:
    resolve_timeout: float = 0.020  # one resolve attempt
    resolve_retries: int = 3  # the budget of a plain miss is resolve_timeout x resolve_retries
    settle: float = 0.020  # after publishing a claim, wait this long before looking again
    ingest_wait: float = 10.0  # a waiter answers 404 if no source appeared by then
    poll: float = 0.1  # a waiter re-resolves this often
    # Two nodes that claim within about twice the time a claim takes to become visible may not
    # see each other.  That time is about a lookup plus a store, so the settle window grows with
    # the first lookup's duration (a loaded network): settle = clamp(lookup x factor).  Where
    # every lookup asks every node a claim is visible once published: one lookup's time (see
    # the module doc).
    settle_per_lookup: float = 3.0
    settle_per_lookup_reaching_all: float = 1.0
    settle_max: float = 0.25

    def settle_for(self, first_lookup: float, reaches_all: bool = False) -> float:
        factor = self.settle_per_lookup_reaching_all if reaches_all else self.settle_per_lookup
        return max(self.settle, min(first_lookup * factor, self.settle_max))

    @property
    def budget(self) -> float:
        return self.resolve_timeout * self.resolve_retries


@dataclass(frozen=True, slots=True)
class Fetch:
    """Fetch from this provider (`withdraw_claim`: withdraw our claim first; not used now)."""

    sighting: Sighting
    withdraw_claim: bool = False


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing to do until `until`, or until the lookup reports something (`seen`/`round_ended`)."""

    until: float


@dataclass(frozen=True, slots=True)
class Resolve:
    """Start a fresh lookup now (the previous one, if still running, may be dropped)."""


@dataclass(frozen=True, slots=True)
class PublishClaim:
    """Advertise a claim record for the key, then call `step` again."""


@dataclass(frozen=True, slots=True)
class WithdrawClaim:
    """Withdraw our claim record for the key, then call `step` again."""


@dataclass(frozen=True, slots=True)
class Miss:
    """Answer 404.  `claimant`: this node won the claim (its containerd goes upstream for all)."""

    reason: str
    claimant: bool = False
    waited_on: bytes | None = None  # the claimant a waiter gave up on (to distrust its claim)


Step = Fetch | Wait | Resolve | PublishClaim | WithdrawClaim | Miss


class _Phase(enum.Enum):
    LOOKING = "looking"
    SETTLING = "settling"
    WAITING = "waiting"
    DONE = "done"


@dataclass(slots=True)
class ProviderWait:
    """One mirror request's way to a provider (see the module doc)."""

    requester: bytes  # this node's id
    key: str
    started: float
    settings: ClaimSettings = field(default_factory=ClaimSettings)
    claims_enabled: bool = True
    avoid: frozenset[PeerKey] = frozenset()  # quarantined or stale for this key
    distrusted_claims: frozenset[bytes] = frozenset()  # claimants that recently did not deliver
    busy_peers: BusyPeers = field(default_factory=BusyPeers)
    lookups_reach_all: bool = False  # every lookup asks every node (a cluster within k)

    phase: _Phase = _Phase.LOOKING
    sources: dict[PeerKey, Sighting] = field(default_factory=dict)
    claims: dict[bytes, Sighting] = field(default_factory=dict)
    excluded: set[PeerKey] = field(default_factory=set)
    own_claim: bool = False
    claim_at: float = 0.0
    round_started: float = 0.0
    round_done: bool = False
    fetching: bool = False  # a Fetch went out and has not been reported failed
    last_failure: float = 0.0
    failures: int = 0  # failed fetches (busy answers do not count)
    need_round: bool = False  # the sources seen so far are used up: look again
    wait_started: float = 0.0
    resolve_due: float | None = None  # when WAITING/SETTLING next starts a lookup
    waited_on: bytes | None = None
    reason: str = ""
    first_lookup: float | None = None  # how long the first lookup took to converge
    settle: float = 0.0  # the settle window chosen when our claim went out
    confirm_until: float | None = None  # a late claim that would win looks again until then

    def __post_init__(self) -> None:
        self.round_started = self.started

    @property
    def decided(self) -> bool:
        """A Miss was returned: the request is over for this machine."""
        return self.phase is _Phase.DONE

    # -- inputs ------------------------------------------------------------------------------------

    def seen(self, sighting: Sighting) -> None:
        """A lookup returned this record (the newest state of a provider replaces older ones)."""
        if sighting.node_id == self.requester:
            return
        if sighting.state.is_source:
            self.sources[sighting.address] = sighting
            self.claims.pop(sighting.node_id, None)  # its claim turned into a copy
        elif sighting.node_id not in self.distrusted_claims:
            self.claims[sighting.node_id] = sighting

    def round_ended(self, now: float | None = None) -> None:
        """The current lookup converged: everything it could find was reported (at `now`)."""
        self.round_done = True
        if self.first_lookup is None and now is not None:
            self.first_lookup = now - self.round_started

    def exclude(self, peer: PeerKey, now: float) -> None:
        """A fetch from `peer` failed (or its stream broke): look for another source.

        Counts towards `resolve_retries` failed fetches, after which the request misses.  The next
        step looks again from LOOKING (a fresh attempt), so a stream that broke late still finds
        the providers that appeared meanwhile.
        """
        self.excluded.add(peer)
        self.fetching = False
        self.last_failure = now
        self.failures += 1
        self.need_round = True
        if self.phase is not _Phase.DONE:
            self.phase = _Phase.LOOKING

    def busy(self, peer: PeerKey, until: float, now: float) -> None:
        """`peer` answered busy; skip it until `until` (not a failure: it may serve later)."""
        self.busy_peers.add(peer, until)
        self.fetching = False
        self.last_failure = now

    # -- decisions ---------------------------------------------------------------------------------

    def _usable(self, now: float) -> list[Sighting]:
        ranked = rank_providers(self.requester, self.key, self.sources.values())
        return [
            s
            for s in ranked
            if s.address not in self.excluded
            and s.address not in self.avoid
            and not self.busy_peers.busy(s.address, now)
        ]

    def _waitable(self, now: float) -> bool:
        """Sources exist that are only busy (not failed or avoided): worth waiting for."""
        return any(
            s.address not in self.excluded
            and s.address not in self.avoid
            and self.busy_peers.busy(s.address, now)
            for s in self.sources.values()
        )

    def _miss(self, reason: str, *, claimant: bool = False) -> Miss:
        self.phase = _Phase.DONE
        self.reason = reason
        return Miss(reason, claimant, None if claimant else self.waited_on)

    def _start_round(self, now: float) -> Resolve:
        self.round_started = now
        self.round_done = False
        self.resolve_due = None
        return Resolve()

    def _enter_waiting(self, now: float, waited_on: bytes | None) -> Step:
        self.phase = _Phase.WAITING
        self.wait_started = now
        self.waited_on = waited_on
        self.resolve_due = now + self.settings.poll
        return self.step(now)

    def step(self, now: float) -> Step:
        """What to do next at `now`."""
        if self.phase is _Phase.DONE:
            raise RuntimeError("step() after the request was decided")
        if self.fetching:
            raise RuntimeError("step() while a fetch is in progress (report it first)")
        if self.failures >= self.settings.resolve_retries:
            return self._miss(f"all request retries exhausted for {self.key}")
        usable = self._usable(now)
        if usable:
            # a claim of ours stays while this fetch runs: if the source fails, the claim is
            # decided as if it had never appeared (the driver withdraws it when the request ends)
            if self.phase is _Phase.SETTLING:
                self.phase = _Phase.LOOKING
            self.fetching = True
            return Fetch(usable[0])
        if self.need_round and (self.round_done or self.phase is _Phase.LOOKING):
            self.need_round = False
            return self._start_round(now)
        if self.phase is _Phase.LOOKING:
            return self._looking(now)
        if self.phase is _Phase.SETTLING:
            return self._settling(now)
        return self._waiting(now)

    def _looking(self, now: float) -> Step:
        # the first attempt; after a failed fetch, one more attempt's time for the next provider
        attempt_end = max(self.started, self.last_failure) + self.settings.resolve_timeout
        if not self.round_done and now < attempt_end:
            return Wait(attempt_end)
        if not self.claims_enabled:
            if self._waitable(now):
                return self._enter_waiting(now, None)
            if self.sources:
                return self._miss(f"all providers of {self.key} failed")
            if not self.round_done and now < self.started + self.settings.budget:
                return Wait(self.started + self.settings.budget)
            return self._miss(f"could not find peer for {self.key}")
        if self.own_claim:
            # a source found while settling failed: decide the claim as if it had not appeared
            self.phase = _Phase.SETTLING
            self.resolve_due = None
            return self._settling(now)
        if self.claims:
            return self._enter_waiting(now, min(self.claims, key=lambda n: claim_rank(n, self.key)))
        if self._waitable(now):
            return self._enter_waiting(now, None)
        # nothing usable: nobody has it, or every source failed (a provider deleted it, or an
        # inflight tree lost its root): elect one node to go upstream rather than all of them
        self.phase = _Phase.SETTLING
        self.own_claim = True
        self.claim_at = now
        first = self.first_lookup if self.first_lookup is not None else now - self.started
        self.settle = self.settings.settle_for(first, self.lookups_reach_all)
        self.resolve_due = now + self.settle
        return PublishClaim()

    def _settling(self, now: float) -> Step:
        # the lookup after the settle gets at least one attempt's time (or two first lookups')
        first = self.first_lookup if self.first_lookup is not None else 0.0
        second_round = max(self.settings.resolve_timeout, 2 * first)
        decide_by = max(
            self.started + self.settings.budget, self.claim_at + self.settle + second_round
        )
        if self.resolve_due is not None:
            if now < self.resolve_due:
                return Wait(self.resolve_due)
            if self.first_lookup is None and not self.round_done:
                # the claim went out before the first lookup converged: its length, which the
                # window must cover, is not known yet.  Let it converge (no later than the
                # three-lookup window would start the second lookup), then size the window by it.
                latest = self.claim_at + self.settings.settle_for(self.claim_at - self.started)
                if now < latest:
                    return Wait(latest)
            elif self.first_lookup is not None:
                settle = self.settings.settle_for(self.first_lookup, self.lookups_reach_all)
                if settle > self.settle:
                    self.settle = settle
                    self.resolve_due = self.claim_at + settle
                    if now < self.resolve_due:
                        return Wait(self.resolve_due)
            return self._start_round(now)
        if self.confirm_until is not None:
            # a confirming lookup gets the same time as the second one
            decide_by = max(decide_by, self.round_started + second_round)
        if not self.round_done and now < decide_by:
            return Wait(decide_by)
        lowest = min([self.requester, *self.claims], key=lambda n: claim_rank(n, self.key))
        if lowest == self.requester:
            if not self.claims or self.claim_at - self.started < self.settings.settle:
                return self._miss(
                    f"claimed {self.key}: this node fetches it upstream", claimant=True
                )
            # a late claim (see the module doc): the other claimants may not have seen ours
            if self.confirm_until is None:
                self.confirm_until = now + self.settings.settle_max + self.settings.budget
            if now + self.settings.poll <= self.confirm_until:
                self.claims.clear()  # the next lookup says which claims still stand
                self.resolve_due = now + self.settings.poll
                return Wait(self.resolve_due)
            lowest = min(self.claims, key=lambda n: claim_rank(n, self.key))
        self.own_claim = False
        self.phase = _Phase.WAITING
        self.wait_started = self.started
        self.waited_on = lowest
        self.resolve_due = now + self.settings.poll
        return WithdrawClaim()

    def _waiting(self, now: float) -> Step:
        deadline = self.wait_started + self.settings.ingest_wait
        if now >= deadline:
            who = "the claimant's ingest" if self.waited_on is not None else "a free provider"
            return self._miss(f"waited too long for {who} of {self.key}")
        round_over = now >= self.round_started + max(self.settings.poll, self.settings.budget)
        if (self.round_done or round_over) and self.resolve_due is None:
            # the last lookup ended without a usable source
            if not self.claims and not self._waitable(now):
                return self._miss(f"the claim on {self.key} went away without a provider")
            self.resolve_due = now + self.settings.poll
        if self.resolve_due is not None:
            if now < self.resolve_due:
                return Wait(min(self.resolve_due, deadline))
            self.claims.clear()  # the next lookup says which claims still stand
            return self._start_round(now)
        return Wait(deadline)
