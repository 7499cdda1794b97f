"""The iterative lookup state machine (FIND_NODE or GET_PROVIDERS), pure and clock-free.

Why a separate machine: the protocol core owns RPCs and timers; this only decides whom to ask next.
It keeps `alpha` requests in flight at once. A request that is slow is marked *stalled* by the core
(per-RPC soft deadline); a stalled request no longer counts against `alpha`, so a dead or slow
contact is replaced at once instead of stalling the lookup. A stalled contact that answers after all
is still used. The lookup has converged when, among the `k` nearest contacts not known to be failed
or stalled, nobody is left to ask and nobody is still being asked.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

from dht.ids import Contact, as_int

NEW, INFLIGHT, STALLED, DONE, FAILED = range(5)


@dataclass(slots=True)
class Candidate:
    contact: Contact
    distance: int
    depth: int  # 0 = from our own table; d+1 = learned from a depth-d reply
    state: int = NEW
    token: bytes = b""


@dataclass(frozen=True, slots=True)
class LookupStats:
    rpcs: int  # requests sent
    rounds: int  # longest chain of requests, each learned from the previous reply
    rpcs_to_first_provider: int | None
    rounds_to_first_provider: int | None
    providers: int
    converged: bool


class Lookup:
    def __init__(
        self,
        target: bytes,
        seeds: Iterable[Contact],
        *,
        self_id: bytes,
        k: int = 20,
        alpha: int = 3,
    ) -> None:
        self.target = target
        self.self_id = self_id
        self.k = k
        self.alpha = alpha
        self._t = as_int(target)
        self._by_id: dict[bytes, Candidate] = {}
        self._order: list[Candidate] = []  # sorted by distance to target
        self.active = 0  # requests in flight and not stalled
        self.rpcs = 0
        self.rounds = 0
        self.providers = 0
        self.rpcs_to_first_provider: int | None = None
        self.rounds_to_first_provider: int | None = None
        self.finished = False
        for contact in seeds:
            self._offer(contact, 0)

    def _offer(self, contact: Contact, depth: int) -> None:
        if contact.node_id == self.self_id or contact.node_id in self._by_id:
            return
        cand = Candidate(contact, as_int(contact.node_id) ^ self._t, depth)
        self._by_id[contact.node_id] = cand
        bisect.insort(self._order, cand, key=lambda c: c.distance)

    def candidate(self, node_id: bytes) -> Candidate | None:
        return self._by_id.get(node_id)

    def next_queries(self) -> list[Candidate]:
        """Candidates to ask now (marked in flight); none if `alpha` are busy or nobody is left."""
        picks: list[Candidate] = []
        if self.finished:
            return picks
        live = 0
        pending = False
        for cand in self._order:
            if live >= self.k:
                break
            state = cand.state
            if state == FAILED or state == STALLED:
                continue
            live += 1
            if state == NEW:
                if self.active < self.alpha:
                    cand.state = INFLIGHT
                    self.active += 1
                    self.rpcs += 1
                    self.rounds = max(self.rounds, cand.depth + 1)
                    picks.append(cand)
                    pending = True
                else:
                    pending = True
            elif state == INFLIGHT:
                pending = True
        if not pending:
            self.finished = True
        return picks

    def replied(
        self, node_id: bytes, nodes: Iterable[Contact], token: bytes, providers: int = 0
    ) -> None:
        cand = self._settle(node_id, DONE)
        if cand is None:
            return
        cand.token = token
        for contact in nodes:
            self._offer(contact, cand.depth + 1)
        if providers:
            if self.rpcs_to_first_provider is None:
                self.rpcs_to_first_provider = self.rpcs
                self.rounds_to_first_provider = cand.depth + 1
            self.providers += providers

    def stalled(self, node_id: bytes) -> None:
        cand = self._by_id.get(node_id)
        if cand is not None and cand.state == INFLIGHT:
            cand.state = STALLED
            self.active -= 1

    def failed(self, node_id: bytes) -> None:
        self._settle(node_id, FAILED)

    def _settle(self, node_id: bytes, state: int) -> Candidate | None:
        """Mark an open candidate DONE or FAILED, freeing its slot; None if it was not open."""
        cand = self._by_id.get(node_id)
        if cand is None or cand.state in (DONE, FAILED):
            return None
        if cand.state == INFLIGHT:
            self.active -= 1
        cand.state = state
        return cand

    def found_locally(self, providers: int) -> None:
        if providers and self.rpcs_to_first_provider is None:
            self.rpcs_to_first_provider = 0
            self.rounds_to_first_provider = 0
        self.providers += providers

    def responders(self) -> list[Candidate]:
        """The nearest `k` contacts that answered, nearest first (with the tokens they gave us)."""
        return [c for c in self._order if c.state == DONE][: self.k]

    def stats(self) -> LookupStats:
        return LookupStats(
            rpcs=self.rpcs,
            rounds=self.rounds,
            rpcs_to_first_provider=self.rpcs_to_first_provider,
            rounds_to_first_provider=self.rounds_to_first_provider,
            providers=self.providers,
            converged=self.finished,
        )
