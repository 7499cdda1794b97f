"""Answering other nodes: what this node tells a peer that pings it, asks it for nodes or providers,
or hands it a provider record.

Why its own module: `dht.protocol` is the requesting side's state machine (lookups, announces,
timers); answering is stateless per request and reads only the routing table, the provider store
and the token issuer.  Pure: a request in, the reply out (no sockets, no clock reads).

What a request may do depends on what its datagram proves (`Proof`): with the cluster key every
datagram is authenticated; without it, a request carrying the write token this node gave its IP
proves only that the sender receives at that address.  The reply to an unproven request is made no
larger than the request (`fit`), so a forged source address gains no amplification.  A provider
record is kept in the slot of the datagram's source address with the source IP as its address
(`dht.providers`), its ttl capped by state; other addresses (version 3) are kept only from an
authenticated sender, and in-flight/claim records only from an authenticated sender or from the
address this node's routing table (or its replacement cache) already held for the sender's id.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass

from dht import codec
from dht.addresses import kept_more_hosts
from dht.codec import (
    Ack,
    AddProvider,
    FindNode,
    GetProviders,
    Message,
    Nodes,
    Ping,
    Pong,
    Providers,
)
from dht.ids import ProviderInfo, RecordState
from dht.providers import ProviderStore
from dht.routing_table import RoutingTable
from dht.tokens import TOKEN_BYTES, TokenIssuer

__all__ = ["Proof", "Responder", "fit"]


@dataclass(frozen=True, slots=True)
class Proof:
    """What one request datagram proves about its sender."""

    authenticated: bool  # it carried a valid MAC under the cluster key
    address: bool  # its source address is proven (authenticated, or a valid token for its IP)


def fit(reply: Message, budget: int) -> bytes | None:
    """`reply` encoded in at most `budget` bytes: lists trimmed, then without its token if need be
    (the requester asks again); None when even that does not fit."""
    data = codec.encode(reply, budget)
    if len(data) <= budget:
        return data
    if isinstance(reply, (Pong, Nodes, Providers, Ack)) and reply.token:
        data = codec.encode(dataclasses.replace(reply, token=b""), budget)
        if len(data) <= budget:
            return data
    return None


@dataclass(slots=True)
class Responder:
    """Replies to requests from this node's routing table and provider store."""

    node_id: bytes
    k: int
    table: RoutingTable
    store: ProviderStore
    tokens: TokenIssuer
    rng: random.Random
    # the most a record of each state may live, whatever ttl its sender asks for
    ttl_cap: Callable[[RecordState], float] = lambda state: float(codec.MAX_TTL)
    tokens_refused: int = 0  # provider records refused for a bad or stale token
    claims_refused: int = 0  # in-flight/claim records refused from an unproven sender
    more_hosts_dropped: int = 0  # other addresses ignored from an unauthenticated sender

    def proof(self, msg: Message, source_ip: str, authenticated: bool, now: float) -> Proof:
        """What request `msg` from `source_ip` proves (a token in it is checked here)."""
        if authenticated:
            return Proof(True, True)
        token = msg.token if isinstance(msg, AddProvider) else getattr(msg, "proof", b"")
        ok = len(token) == TOKEN_BYTES and self.tokens.check(source_ip, token, now)
        return Proof(False, ok)

    def answer(
        self,
        msg: Message,
        source: tuple[str, int],
        now: float,
        proof: Proof = Proof(True, True),
    ) -> Message | None:
        """The reply to request `msg` from `source` (None: not a request)."""
        source_ip = source[0]
        me, k = self.node_id, self.k
        match msg:
            case Ping():
                return Pong(msg.txid, me, self.tokens.issue(source_ip, now))
            case FindNode():
                nodes = tuple(self.table.closest(msg.target, k, exclude=msg.sender))
                return Nodes(msg.txid, me, self.tokens.issue(source_ip, now), nodes)
            case GetProviders():
                providers = self.store.get(msg.key, now, self.rng)[msg.offset :]
                nodes = tuple(self.table.closest(msg.key, k, exclude=msg.sender))
                token = self.tokens.issue(source_ip, now)
                return Providers(msg.txid, me, token, tuple(providers), False, nodes)
            case AddProvider():
                token = self.tokens.issue(source_ip, now)
                nodes = tuple(self.table.closest(msg.key, k, exclude=msg.sender))
                stored = self._store(msg, source, now, proof)
                return Ack(msg.txid, me, stored, token, nodes)
        return None

    def _store(self, msg: AddProvider, source: tuple[str, int], now: float, proof: Proof) -> bool:
        """Keep (or, with ttl 0, drop) the sender's record in its source's slot; False when its
        token or its state is refused, or a bound is reached."""
        source_ip = source[0]
        if not self.tokens.check(source_ip, msg.token, now):
            self.tokens_refused += 1
            return False
        if msg.ttl == 0:  # the sender withdraws its own record (its slot), nobody else's
            self.store.remove(msg.key, source)
            return True
        if msg.state is not RecordState.COMPLETE and not proof.authenticated:
            if not self.table.knows_at(msg.sender, source):  # as known before this datagram
                self.claims_refused += 1
                return False
        ttl = min(float(msg.ttl), self.ttl_cap(msg.state), float(codec.MAX_TTL))
        more_hosts: tuple[str, ...] = ()
        if msg.more_hosts and proof.authenticated:
            more_hosts = kept_more_hosts(msg.more_hosts, source_ip)
        elif msg.more_hosts:
            self.more_hosts_dropped += 1
        record = ProviderInfo(msg.sender, source_ip, msg.port, msg.state, more_hosts)
        return self.store.add(msg.key, record, now + ttl, source)
