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
import random
from collections.abc import Iterable

from dht import codec
from dht.addresses import UNSPECIFIED, reported
from dht.codec import Ack, AddProvider, DecodeError, Message, Nodes, Ping, Providers
from dht.config import ProtocolConfig as ProtocolConfig
from dht.config import Statistics as Statistics
from dht.effects import Effect, ProvidersFound
from dht.ids import Contact, ProviderInfo, RecordState, key_id, random_id_in_bucket
from dht.jobs import L_ANNOUNCE, L_REFRESH, L_RESOLVE, Jobs
from dht.providers import ProviderStore
from dht.ratelimit import SourceLimiter
from dht.relocation import Relocations
from dht.responder import Responder
from dht.rpc import (
    P_ADD,
    P_BOOTSTRAP,
    P_EVICT_PING,
    P_LOOKUP,
    P_MOVE,
    P_VERIFY,
    PONG_SIZE,
    T_DUE,
    T_MAINTENANCE,
    T_PACE,
    T_STALL,
    Pending,
)
from dht.tokens import TokenIssuer

__all__ = ["PONG_SIZE", "TTL_SLACK", "DhtProtocol", "ProtocolConfig", "Statistics"]

OWN_SLOT = ("0.0.0.0", 0)  # the store slot of this node's own records

BOOTSTRAP_TRIES = 3
TTL_SLACK = 1.25  # a stored record lives at most this times our own ttl for its state
MAX_VERIFYING = 64  # pings in flight to unproven requesters before they enter the table
PADDED_PING = PONG_SIZE + 1  # a padded ping is this long at most (its length header may grow)


class DhtProtocol(Jobs):
    """The whole core: `dht.rpc` (requests in flight) < `dht.jobs` (lookups, announces, joins) <
    this (the public API, answering requests, replies, timeouts, trust, maintenance)."""

    def __init__(self, config: ProtocolConfig, rng: random.Random | None = None) -> None:
        super().__init__(config, rng)
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
        self._maintenance_at: float | None = None

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

    # -- internals: what a reply or a request teaches the table ---------------------------------

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

    def _on_failure(self, pending: Pending, now: float, out: list[Effect]) -> None:
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
