"""The core's long-running work: lookups (resolve, announce, join, bucket refresh), the announce
queue and the bootstrap joins that start them.

Why a layer of its own: a lookup is a `dht.lookup.Lookup` (pure: who to ask next) driven by
replies; this layer turns its next queries into requests (`dht.rpc`), ends it with the right
effect, and paces announces (`dht.announce` schedule, a token bucket). Invariants: `_announcing`
counts the announce lookups in `_lookups`, never more than `announce_concurrency` start at once;
a key's holders list (who got an in-flight/claim record of ours) is at most 2k long.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

from dht.addresses import PlainContacts
from dht.announce import AnnounceSchedule
from dht.codec import AddProvider, FindNode, GetProviders, Ping
from dht.config import ProtocolConfig
from dht.effects import BootstrapDone, Effect, LookupDone
from dht.ids import ID_BITS, Contact, RecordState, random_id_in_bucket
from dht.lookup import Lookup
from dht.ratelimit import TokenBucket
from dht.routing_table import RoutingTable
from dht.rpc import P_ADD, P_BOOTSTRAP, P_LOOKUP, T_DUE, T_PACE, Rpcs

# lookup purposes
L_RESOLVE, L_ANNOUNCE, L_JOIN, L_REFRESH = range(4)


@dataclass(slots=True)
class LookupJob:
    lookup: Lookup
    purpose: int
    ref: int = 0  # bootstrap job id for joins
    key: bytes = b""
    # resolve: providers reported, by (id, address)
    seen: dict[tuple[bytes, str], RecordState] = field(default_factory=dict)
    stored: set[bytes] = field(default_factory=set)  # announce: who already took our record


@dataclass(slots=True)
class BootstrapJob:
    addrs: list[tuple[str, int]]
    waiting: int
    tries: dict[tuple[str, int], int] = field(default_factory=dict)


class Jobs(Rpcs):
    """Lookups, announces and joins over the requests layer."""

    def __init__(self, config: ProtocolConfig, rng: random.Random | None = None) -> None:
        super().__init__(config, rng)
        self.table = RoutingTable(config.node_id, config.k)
        self.schedule = AnnounceSchedule(
            config.refresh,
            self.rng,
            refresh_by_state={s: config.refresh_for(s) for s in RecordState},
        )
        self.pacer = TokenBucket(config.announce_rate, config.announce_burst)
        # where our in-flight/claim records went, so withdrawing one reaches them at once
        self._holders: dict[bytes, dict[bytes, Contact]] = {}
        self._lookups: dict[int, LookupJob] = {}
        self._ids = itertools.count(1)
        self._bootstraps: dict[int, BootstrapJob] = {}
        self._bootstrap_addrs: list[tuple[str, int]] = []
        self._plain = PlainContacts()  # older nodes: ADD_PROVIDER without our other addresses
        self._announcing = 0
        self._due_at: float | None = None
        self._starting = False
        self._pace_timer: float | None = None

    def _new_lookup(self, target: bytes, purpose: int, now: float) -> LookupJob:
        seeds = self.table.closest(target, self.config.k)
        k, alpha = self.config.k, self.config.alpha
        lookup = Lookup(target, seeds, self_id=self.node_id, k=k, alpha=alpha)
        job = LookupJob(lookup, purpose, next(self._ids), target)
        self._lookups[job.ref] = job
        self.table.touch(target, now)
        return job

    def _pump(self, job: LookupJob, now: float, out: list[Effect]) -> None:
        lookup = job.lookup
        for cand in lookup.next_queries():
            txid = self._txid()
            msg: FindNode | GetProviders | AddProvider
            if job.purpose == L_RESOLVE:
                msg = GetProviders(txid, self.node_id, lookup.target, 0)
            elif job.purpose == L_ANNOUNCE and (token := self._fresh_token(cand.contact, now)):
                msg = self._add_provider(txid, lookup.target, token, cand.contact.node_id, now)
                self._note_holder(lookup.target, cand.contact)
            else:
                msg = FindNode(txid, self.node_id, lookup.target)
            self._request(msg, cand.contact.addr, cand.contact.node_id, P_LOOKUP, job.ref, now, out)
        if lookup.finished and self._lookups.pop(job.ref, None) is not None:
            self._finished(job, now, out)

    def _finished(self, job: LookupJob, now: float, out: list[Effect]) -> None:
        if job.purpose == L_RESOLVE:
            out.append(LookupDone(job.ref, job.lookup.stats()))
        elif job.purpose == L_JOIN:
            out.append(BootstrapDone(job.ref, len(self.table)))
            # the self-lookup taught us our neighbourhood; the far buckets, which hold the first hop
            # of most lookups, are filled by looking up a random id in each
            for index in range(ID_BITS - 1, ID_BITS - 1 - self.config.join_refresh, -1):
                target = random_id_in_bucket(self.node_id, index, self.rng)
                self._pump(self._new_lookup(target, L_REFRESH, now), now, out)
        elif job.purpose == L_ANNOUNCE:
            self._announcing -= 1
            kid = job.key
            responders = job.lookup.responders()
            if kid in self.schedule:
                for cand in responders:
                    if cand.contact.node_id in job.stored:
                        continue  # already stored while looking up
                    msg = self._add_provider(
                        self._txid(), kid, cand.token, cand.contact.node_id, now
                    )
                    self._note_holder(kid, cand.contact)
                    self._request(msg, cand.contact.addr, cand.contact.node_id, P_ADD, 0, now, out)
                # nobody to tell yet (alone, or cut off): try again soon rather than in `refresh`
                delay = None if responders else min(self.config.refresh, 30.0)
                self.schedule.reschedule(kid, now, delay)
                self._arm_due()
            self._start_announces(now, out)

    def _add_provider(
        self, txid: int, kid: bytes, token: bytes, to: bytes, now: float
    ) -> AddProvider:
        """Our record of `kid`, in the state it is advertised with now, for node `to` (our other
        addresses too, unless `to` lately did not answer that form)."""
        state = self.schedule.state(kid)
        ttl = int(self.config.ttl_for(state))
        more_hosts = () if self._plain(to, now) else self.config.more_hosts
        port = self.config.registry_port
        return AddProvider(txid, self.node_id, kid, port, ttl, token, state, more_hosts)

    def _note_holder(self, kid: bytes, contact: Contact) -> None:
        """Remember who got an in-flight/claim record of ours (bounded by k per such key)."""
        if self.schedule.state(kid) is RecordState.COMPLETE:
            self._holders.pop(kid, None)  # complete records lapse with their ttl
            return
        holders = self._holders.setdefault(kid, {})
        if contact.node_id in holders or len(holders) < 2 * self.config.k:
            holders[contact.node_id] = contact

    def _start_announces(self, now: float, out: list[Effect]) -> None:
        if self._starting or not len(self.table):
            return  # re-entered from a job that finished at once; or nobody to announce to yet
        self._starting = True
        try:
            while self._announcing < self.config.announce_concurrency:
                if not self.schedule.queued():
                    return
                if not self.pacer.take(now):
                    if self._pace_timer is None:
                        self._pace_timer = self.pacer.next_token_at(now)
                        self._timer(self._pace_timer, T_PACE, 0)
                    return
                kid = self.schedule.pop_queued()
                if kid is None:
                    return
                self._announcing += 1
                self._pump(self._new_lookup(kid, L_ANNOUNCE, now), now, out)
        finally:
            self._starting = False

    def _arm_due(self) -> None:
        due = self.schedule.next_due()
        if due is not None and (self._due_at is None or due < self._due_at):
            self._due_at = due
            self._timer(due, T_DUE, 0)

    def _bootstrap_step(self, job_id: int, now: float, out: list[Effect]) -> None:
        boot = self._bootstraps.get(job_id)
        if boot is None:
            return
        boot.waiting -= 1
        if boot.waiting <= 0:
            self._join(job_id, now, out)

    def _join(self, job_id: int, now: float, out: list[Effect]) -> None:
        self._bootstraps.pop(job_id, None)
        job = self._new_lookup(self.node_id, L_JOIN, now)
        self._lookups.pop(job.ref)
        job.ref = job_id
        self._lookups[job_id] = job
        self._pump(job, now, out)
        self._start_announces(now, out)

    def _bootstrap(self, addrs: list[tuple[str, int]], now: float, out: list[Effect]) -> int:
        job_id = next(self._ids)
        if addrs:
            self._bootstrap_addrs = addrs
        self._bootstraps[job_id] = BootstrapJob(addrs, len(addrs), dict.fromkeys(addrs, 1))
        for addr in addrs:
            ping = Ping(self._txid(), self.node_id)
            self._request(ping, addr, None, P_BOOTSTRAP, job_id, now, out)
        if not addrs:
            self._join(job_id, now, out)
        return job_id
