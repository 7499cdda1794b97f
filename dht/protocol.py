"""The Kademlia protocol core: datagrams and time in, effects out. No sockets, no clock reads.

Why sans-IO: the same object runs under the Trio driver (`dht.node`), under an in-memory network
with a mock clock (`dht.simulation`), and in unit tests, so what the tests and the 5000-node
simulation prove is what runs in production. The caller passes `now` (seconds, monotonic) into every
call and asks `next_deadline()` when to call `handle_timeouts` next.

Trust (see docs/security/dht.md): with the cluster key every datagram is authenticated.  Without
it, a datagram proves nothing by itself: a reply proves its source address (it echoes the random
transaction id we sent there), a request proves it only with our token for its IP.  Only proven
addresses enter the routing table; a known id never moves on one datagram (`dht.relocation`);
replies to unproven requests are no larger than the request (`dht.responder.fit`), and our own
requests carry the peer's token or padding so that its full answer fits.  Secrets and transaction
ids come from the OS (`os.urandom`) unless a seeded `random.Random` is injected (simulation, tests).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from cachetools import LRUCache

from dht import codec
from dht.addresses import UNSPECIFIED, PlainContacts, reported
from dht.announce import AnnounceSchedule
from dht.codec import (
    Ack,
    AddProvider,
    DecodeError,
    FindNode,
    GetProviders,
    Message,
    Nodes,
    Ping,
    Pong,
    Providers,
)
from dht.config import ProtocolConfig as ProtocolConfig
from dht.config import Statistics as Statistics
from dht.effects import BootstrapDone, Effect, LookupDone, ProvidersFound, Send
from dht.ids import ID_BITS, Contact, ProviderInfo, RecordState, key_id, random_id_in_bucket
from dht.lookup import Lookup
from dht.providers import ProviderStore
from dht.ratelimit import SourceLimiter, TokenBucket
from dht.relocation import Relocations
from dht.responder import Responder, fit
from dht.routing_table import RoutingTable
from dht.tokens import TokenIssuer

OWN_SLOT = ("0.0.0.0", 0)  # the store slot of this node's own records

# what a pending RPC is for
P_LOOKUP, P_EVICT_PING, P_BOOTSTRAP, P_ADD, P_MOVE, P_VERIFY = range(6)
# lookup purposes
L_RESOLVE, L_ANNOUNCE, L_JOIN, L_REFRESH = range(4)
# timer kinds
T_STALL, T_TIMEOUT, T_MAINTENANCE, T_DUE, T_PACE = range(5)

BOOTSTRAP_TRIES = 3
TOKEN_FRESH = 240.0  # a token we were given stays usable this long (secrets rotate every 300 s)
TOKEN_CACHE = 8192
TTL_SLACK = 1.25  # a stored record lives at most this times our own ttl for its state
MAX_VERIFYING = 64  # pings in flight to unproven requesters before they enter the table
# a ping padded so that the largest pong (with a token) fits in the size of the ping
PONG_SIZE = len(codec.encode(Pong(codec.MAX_TXID, bytes(32), bytes(8))))
PADDED_PING = PONG_SIZE + 1  # a padded ping is this long at most (its length header may grow)

_REPLY_TYPE = {Ping: Pong, FindNode: Nodes, GetProviders: Providers, AddProvider: Ack}


@dataclass(slots=True)
class _Pending:
    addr: tuple[str, int]
    node_id: bytes | None
    reply_type: type
    purpose: int
    ref: int
    # an ADD_PROVIDER naming our other addresses (version 3): the plain one, sent if this times out
    plain_retry: AddProvider | None = None


@dataclass(slots=True)
class _LookupJob:
    lookup: Lookup
    purpose: int
    ref: int = 0  # bootstrap job id for joins
    key: bytes = b""
    # resolve: providers reported, by (id, address)
    seen: dict[tuple[bytes, str], RecordState] = field(default_factory=dict)
    stored: set[bytes] = field(default_factory=set)  # announce: who already took our record


@dataclass(slots=True)
class _Bootstrap:
    addrs: list[tuple[str, int]]
    waiting: int
    tries: dict[tuple[str, int], int] = field(default_factory=dict)


class DhtProtocol:
    def __init__(self, config: ProtocolConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self.node_id = config.node_id
        # secrets and nonces: the OS's, unless the caller injects a seeded rng for determinism
        self._random_bytes = os.urandom if rng is None else rng.randbytes
        self.rng = rng or random.Random(os.urandom(16))
        self.table = RoutingTable(config.node_id, config.k)
        self.tokens = TokenIssuer(self._random_bytes)
        # the answering side (dht.responder): reads the table, the store and the tokens
        self.responder = Responder(
            config.node_id,
            config.k,
            self.table,
            ProviderStore(),
            self.tokens,
            self.rng,
            ttl_cap=lambda state: TTL_SLACK * config.ttl_for(state),
        )
        self.relocations = Relocations()
        self._verifying: set[bytes] = set()  # unproven requesters being pinged (bounded)
        self.limiter = SourceLimiter(config.rate, config.burst)
        self.schedule = AnnounceSchedule(
            config.refresh,
            self.rng,
            refresh_by_state={s: config.refresh_for(s) for s in RecordState},
        )
        # where our in-flight/claim records went, so withdrawing one reaches them at once
        self._holders: dict[bytes, dict[bytes, Contact]] = {}
        self._pending: dict[int, _Pending] = {}
        self._timers: list[tuple[float, int, int, int]] = []  # (when, seq, kind, ref)
        self._seq = itertools.count()
        self._lookups: dict[int, _LookupJob] = {}
        self._ids = itertools.count(1)
        self._bootstraps: dict[int, _Bootstrap] = {}
        # tokens others gave us, by their address: an announce lookup sends ADD_PROVIDER at once
        # (its ACK lists closer nodes like a FIND_NODE reply) to nodes whose token is fresh
        self._their_tokens: LRUCache[tuple[str, int], tuple[bytes, float]] = LRUCache(
            maxsize=TOKEN_CACHE
        )
        self._bootstrap_addrs: list[tuple[str, int]] = []
        self._plain = PlainContacts()  # older nodes: ADD_PROVIDER without our other addresses
        self._announcing = 0
        self._maintenance_at: float | None = None
        self._due_at: float | None = None
        self._starting = False
        self.pacer = TokenBucket(config.announce_rate, config.announce_burst)
        self._pace_timer: float | None = None
        self._c = dict.fromkeys(
            (
                "rpcs_sent rpcs_received rpcs_timed_out bad_datagrams rate_limited"
                " unexpected_replies datagrams_sent datagrams_received replies_trimmed"
            ).split(),
            0,
        )

    @property
    def store(self) -> ProviderStore:
        """The provider records this node holds for others."""
        return self.responder.store

    @store.setter
    def store(self, store: ProviderStore) -> None:
        self.responder.store = store

    # -- public API ------------------------------------------------------------------------------

    def statistics(self) -> Statistics:
        return Statistics(
            table_size=len(self.table),
            records_held=len(self.store),
            keys_advertised=len(self.schedule),
            announces_queued=self.schedule.queued(),
            lookups_active=len(self._lookups),
            rpcs_in_flight=len(self._pending),
            tokens_refused=self.responder.tokens_refused,
            records_refused_quota=self.store.refused_quota,
            claims_refused=self.responder.claims_refused,
            moves_refused=self.relocations.refused,
            **self._c,
        )

    def next_deadline(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def start_resolve(self, key: str, now: float) -> tuple[int, list[Effect]]:
        """Start finding providers of `key`; results come as ProvidersFound / LookupDone effects."""
        out: list[Effect] = []
        self._ensure_maintenance(now)
        kid = key_id(key)
        job = self._new_lookup(kid, L_RESOLVE, now)
        local = self._known(kid, now)
        if local:
            job.seen.update(((p.node_id, p.host), p.state) for p in local)
            job.lookup.found_locally(len(local))
            out.append(ProvidersFound(job.ref, tuple(local)))
        self._pump(job, now, out)
        return job.ref, out

    def known_providers(self, key: str, now: float) -> list[ProviderInfo]:
        """Providers of `key` other than us that this node holds live records of (no lookup)."""
        return self._known(key_id(key), now)

    def _known(self, kid: bytes, now: float) -> list[ProviderInfo]:
        return [p for p in self.store.get(kid, now, self.rng) if p.node_id != self.node_id]

    def cancel_lookup(self, lookup_id: int) -> None:
        job = self._lookups.pop(lookup_id, None)
        if job is not None and job.purpose == L_ANNOUNCE:
            self._announcing -= 1

    def advertise(
        self, keys: Iterable[str], now: float, state: RecordState = RecordState.COMPLETE
    ) -> list[Effect]:
        """Advertise `keys` with `state`; a key advertised with another state switches at once."""
        out: list[Effect] = []
        self._ensure_maintenance(now)
        port, more_hosts = self.config.registry_port, self.config.more_hosts
        me = ProviderInfo(self.node_id, UNSPECIFIED[0], port, state, more_hosts)
        for key in keys:
            kid = key_id(key)
            if self.schedule.add(kid, key, state):
                self.store.add(kid, me, float("inf"), OWN_SLOT, quota=False)
        self._start_announces(now, out)
        return out

    def withdraw(self, keys: Iterable[str], now: float) -> list[Effect]:
        """Stop advertising `keys`; nodes known to hold an in-flight or claim record of ours for
        one of them are told to drop it (complete records lapse with their ttl, as in Spegel)."""
        out: list[Effect] = []
        for key in keys:
            kid = key_id(key)
            if self.schedule.remove(kid):
                self.store.remove(kid, OWN_SLOT)
            for contact in self._holders.pop(kid, {}).values():
                token = self._fresh_token(contact, now)
                if token:
                    port = self.config.registry_port
                    drop = AddProvider(self._txid(), self.node_id, kid, port, 0, token)
                    self._request(drop, contact.addr, contact.node_id, P_ADD, 0, now, out)
        return out

    def bootstrap(self, addrs: Iterable[tuple[str, int]], now: float) -> tuple[int, list[Effect]]:
        """Ping `addrs`, then look up our own id. Ends with a BootstrapDone effect."""
        out: list[Effect] = []
        self._ensure_maintenance(now)
        return self._bootstrap(list(dict.fromkeys(addrs)), now, out), out

    def _bootstrap(self, addrs: list[tuple[str, int]], now: float, out: list[Effect]) -> int:
        job_id = next(self._ids)
        if addrs:
            self._bootstrap_addrs = addrs
        self._bootstraps[job_id] = _Bootstrap(addrs, len(addrs), dict.fromkeys(addrs, 1))
        for addr in addrs:
            ping = Ping(self._txid(), self.node_id)
            self._request(ping, addr, None, P_BOOTSTRAP, job_id, now, out)
        if not addrs:
            self._join(job_id, now, out)
        return job_id

    # -- input -----------------------------------------------------------------------------------

    def handle_datagram(self, data: bytes, addr: tuple[str, int], now: float) -> list[Effect]:
        out: list[Effect] = []
        self._c["datagrams_received"] += 1
        if not self.limiter.allow(addr[0], now):
            self._c["rate_limited"] += 1
            return out
        authenticated = self.config.psk is not None
        try:
            msg = codec.decode(codec.unseal(data, self.config.psk))
        except DecodeError:
            self._c["bad_datagrams"] += 1
            return out
        if msg.sender == self.node_id:  # our own datagram came back: a seed address is us
            pending = self._pending.get(msg.txid)
            if isinstance(msg, Ping) and pending is not None and pending.purpose == P_BOOTSTRAP:
                del self._pending[msg.txid]
                self._bootstrap_step(pending.ref, now, out)
            return out
        if isinstance(msg, codec.REQUEST_TYPES):
            self._c["rpcs_received"] += 1
            proof = self.responder.proof(msg, addr[0], authenticated, now)
            # answered before the sender may enter the table: what the table proves about an id
            # (dht.responder: claims) must predate this datagram
            reply = self.responder.answer(msg, addr, now, proof)
            if reply is not None:
                # an unproven source gets no more bytes than it sent (no amplification)
                self._send(reply, addr, out, None if proof.address else len(data))
            contact = Contact(msg.sender, addr[0], addr[1])
            if proof.address:
                self._seen(contact, now, out)
            else:
                self._verify(contact, len(data), now, out)
        else:
            self._on_reply(msg, addr, now, out)
        return out

    def handle_timeouts(self, now: float) -> list[Effect]:
        out: list[Effect] = []
        while self._timers and self._timers[0][0] <= now:
            when, _, kind, ref = heapq.heappop(self._timers)
            if kind == T_MAINTENANCE:
                if when == self._maintenance_at:
                    self._maintenance_at = None
                    self._maintenance(now, out)
            elif kind == T_PACE:
                if when == self._pace_timer:
                    self._pace_timer = None
                    self._start_announces(now, out)
            elif kind == T_DUE:
                if when == self._due_at:
                    self._due_at = None
                    self.schedule.release_due(now)
                    self._start_announces(now, out)
                    self._arm_due()
            elif kind == T_STALL:
                pending = self._pending.get(ref)
                if pending is not None and pending.purpose == P_LOOKUP:
                    job = self._lookups.get(pending.ref)
                    if job is not None and pending.node_id is not None:
                        job.lookup.stalled(pending.node_id)
                        self._pump(job, now, out)
            else:
                pending = self._pending.pop(ref, None)
                if pending is not None:
                    self._c["rpcs_timed_out"] += 1
                    self._on_failure(pending, now, out)
        return out

    # -- internals: requests -----------------------------------------------------------------------

    def _txid(self) -> int:
        """A fresh random transaction id: the nonce a reply must echo from where we sent it."""
        while True:
            txid = int.from_bytes(self._random_bytes(4), "big") & codec.MAX_TXID
            if txid not in self._pending:
                return txid

    def _timer(self, when: float, kind: int, ref: int) -> None:
        heapq.heappush(self._timers, (when, next(self._seq), kind, ref))

    def _send(
        self, msg: Message, addr: tuple[str, int], out: list[Effect], budget: int | None = None
    ) -> None:
        payload: bytes | None = codec.encode(msg)
        if budget is not None and payload is not None and len(payload) > budget:
            self._c["replies_trimmed"] += 1
            payload = fit(msg, budget)
            if payload is None:
                return
        assert payload is not None
        self._c["datagrams_sent"] += 1
        out.append(Send(addr, codec.seal(payload, self.config.psk)))

    def _request(
        self,
        msg: Ping | FindNode | GetProviders | AddProvider,
        addr: tuple[str, int],
        node_id: bytes | None,
        purpose: int,
        ref: int,
        now: float,
        out: list[Effect],
    ) -> None:
        plain = None
        if isinstance(msg, AddProvider) and msg.more_hosts:
            plain = dataclasses.replace(msg, more_hosts=())
        elif not isinstance(msg, AddProvider) and self.config.psk is None:
            # without the key the receiver answers in full only a proven source: its token for
            # our IP proves us; without one, padding makes its full answer no larger than ours
            entry = self._their_tokens.get(addr)
            if entry is not None and now - entry[1] < TOKEN_FRESH:
                msg = dataclasses.replace(msg, proof=entry[0])
            else:
                msg = codec.padded(msg, PONG_SIZE if isinstance(msg, Ping) else codec.MAX_PAYLOAD)
        self._pending[msg.txid] = _Pending(
            addr, node_id, _REPLY_TYPE[type(msg)], purpose, ref, plain
        )
        self._c["rpcs_sent"] += 1
        self._send(msg, addr, out)
        if purpose == P_LOOKUP:
            self._timer(now + self.config.rpc_stall, T_STALL, msg.txid)
        self._timer(now + self.config.rpc_timeout, T_TIMEOUT, msg.txid)

    def _seen(self, contact: Contact, now: float, out: list[Effect]) -> None:
        """`contact` spoke from a proven address (a reply, or a request with proof)."""
        known = self.table.get(contact.node_id)
        if known is not None and known.addr != contact.addr:
            if self.config.psk is not None:  # an authenticated datagram is proof of the move
                self.table.relocate(contact, now)
            elif self.relocations.start(known, contact):
                # ping both with fresh nonces: it moves only if the new address answers and the
                # old one no longer does (dht.relocation)
                for addr in (known.addr, contact.addr):
                    ping = Ping(self._txid(), self.node_id)
                    self._request(ping, addr, contact.node_id, P_MOVE, 0, now, out)
            return
        stale = self.table.seen(contact, now)
        if stale is not None:  # bucket full: ping its oldest contact before evicting it
            ping = Ping(self._txid(), self.node_id)
            self._request(ping, stale.addr, stale.node_id, P_EVICT_PING, 0, now, out)

    def _verify(self, contact: Contact, size: int, now: float, out: list[Effect]) -> None:
        """An unproven requester the table has room for: ping it (only if its request of `size`
        bytes was at least as large as our ping) and add it when it echoes the nonce from there.
        Bounded."""
        node_id = contact.node_id
        if (
            size < PADDED_PING
            or node_id in self._verifying
            or len(self._verifying) >= MAX_VERIFYING
            or not self.table.has_room(node_id, contact.host)
        ):
            return
        self._verifying.add(node_id)
        ping = Ping(self._txid(), self.node_id)
        self._request(ping, contact.addr, node_id, P_VERIFY, 0, now, out)

    def _on_reply(self, msg: Message, addr: tuple[str, int], now: float, out: list[Effect]) -> None:
        pending = self._pending.get(msg.txid)
        if (
            pending is None
            or pending.addr != addr
            or type(msg) is not pending.reply_type
            or (pending.node_id is not None and pending.node_id != msg.sender)
        ):
            self._c["unexpected_replies"] += 1
            return
        del self._pending[msg.txid]
        if pending.purpose == P_MOVE:
            moved = self.relocations.answered(msg.sender, addr)
            if moved is not None:
                self.table.relocate(moved, now)
            elif addr == getattr(self.table.get(msg.sender), "addr", None):
                self.table.seen(Contact(msg.sender, addr[0], addr[1]), now)
            return
        if pending.purpose == P_VERIFY:
            self._verifying.discard(msg.sender)
        self._seen(Contact(msg.sender, addr[0], addr[1]), now, out)
        token = getattr(msg, "token", b"")
        if token:
            self._their_tokens[addr] = (token, now)
        if pending.purpose == P_BOOTSTRAP:
            self._bootstrap_step(pending.ref, now, out)
        elif pending.purpose == P_LOOKUP:
            job = self._lookups.get(pending.ref)
            if job is None:
                return
            if isinstance(msg, Nodes):
                job.lookup.replied(msg.sender, msg.nodes, token)
            elif isinstance(msg, Ack):  # an announce's ADD_PROVIDER doubling as its query
                job.lookup.replied(msg.sender, msg.nodes, token)
                if msg.stored:
                    job.stored.add(msg.sender)
            elif isinstance(msg, Providers):
                found = []
                keyed = self.config.psk is not None
                for p in reported(msg.providers, msg.sender, addr[0], grouped=keyed):
                    # report a provider once, and again only if a better state turns up for it
                    # (COMPLETE < INFLIGHT < CLAIM): another node holds a newer record
                    before = job.seen.get((p.node_id, p.host))
                    if p.node_id != self.node_id and (before is None or p.state < before):
                        job.seen[(p.node_id, p.host)] = p.state
                        found.append(p)
                job.lookup.replied(msg.sender, msg.nodes, token, len(found))
                if found and job.purpose == L_RESOLVE:
                    out.append(ProvidersFound(job.ref, tuple(found)))
            self._pump(job, now, out)

    def _on_failure(self, pending: _Pending, now: float, out: list[Effect]) -> None:
        if pending.purpose == P_MOVE:  # the id's contact is judged by dht.relocation, not here
            if pending.node_id is not None:
                moved = self.relocations.silent(pending.node_id, pending.addr)
                if moved is not None:
                    self.table.relocate(moved, now)
            return
        if pending.purpose == P_VERIFY:  # never in the table: nothing to fail
            if pending.node_id is not None:
                self._verifying.discard(pending.node_id)
            return
        if pending.node_id is not None and pending.plain_retry is not None:
            # an older node drops version 3 as a bad datagram: not a failure; it gets the plain
            # record now, and for a while (dht.addresses.PlainContacts)
            self._plain.add(pending.node_id, now)
            retry = dataclasses.replace(pending.plain_retry, txid=self._txid())
            self._request(retry, pending.addr, pending.node_id, P_ADD, 0, now, out)
        elif pending.node_id is not None:
            self.table.failed(pending.node_id)
        if pending.purpose == P_BOOTSTRAP:
            boot = self._bootstraps.get(pending.ref)
            if boot is not None and boot.tries.get(pending.addr, BOOTSTRAP_TRIES) < BOOTSTRAP_TRIES:
                boot.tries[pending.addr] += 1  # a seed's ping (or pong) may simply have been lost
                ping = Ping(self._txid(), self.node_id)
                self._request(ping, pending.addr, None, P_BOOTSTRAP, pending.ref, now, out)
            else:
                self._bootstrap_step(pending.ref, now, out)
        elif pending.purpose == P_LOOKUP:
            job = self._lookups.get(pending.ref)
            if job is not None and pending.node_id is not None:
                job.lookup.failed(pending.node_id)
                self._pump(job, now, out)

    # -- internals: lookups ----------------------------------------------------------------------

    def _new_lookup(self, target: bytes, purpose: int, now: float) -> _LookupJob:
        seeds = self.table.closest(target, self.config.k)
        k, alpha = self.config.k, self.config.alpha
        lookup = Lookup(target, seeds, self_id=self.node_id, k=k, alpha=alpha)
        job = _LookupJob(lookup, purpose, next(self._ids), target)
        self._lookups[job.ref] = job
        self.table.touch(target, now)
        return job

    def _pump(self, job: _LookupJob, now: float, out: list[Effect]) -> None:
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

    def _finished(self, job: _LookupJob, now: float, out: list[Effect]) -> None:
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

    def _fresh_token(self, contact: Contact, now: float) -> bytes:
        entry = self._their_tokens.get(contact.addr)
        return entry[0] if entry is not None and now - entry[1] < TOKEN_FRESH else b""

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

    # -- internals: maintenance ------------------------------------------------------------------

    def _ensure_maintenance(self, now: float) -> None:
        if self._maintenance_at is None:
            self._maintenance_at = now + self.config.maintenance_every
            self._timer(self._maintenance_at, T_MAINTENANCE, 0)

    def _maintenance(self, now: float, out: list[Effect]) -> None:
        self.store.expire(now)
        self.schedule.release_due(now)
        self._start_announces(now, out)
        if not len(self.table) and self._bootstrap_addrs and not self._bootstraps:
            self._bootstrap(self._bootstrap_addrs, now, out)  # cut off: try the seeds again
        refreshing = sum(1 for j in self._lookups.values() if j.purpose == L_REFRESH)
        stale = self.table.stale_buckets(now, self.config.bucket_refresh)
        for index in stale[: max(0, 3 - refreshing)]:
            target = random_id_in_bucket(self.node_id, index, self.rng)
            self._pump(self._new_lookup(target, L_REFRESH, now), now, out)
        self._ensure_maintenance(now)
