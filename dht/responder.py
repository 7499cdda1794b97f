"""Answering other nodes: what this node tells a peer that pings it, asks it for nodes or providers,
or hands it a provider record.

Why its own module: `dht.protocol` is the requesting side's state machine (lookups, announces,
timers); answering is stateless per request and reads only the routing table, the provider store
and the token issuer.  Pure: a request in, the reply out (no sockets, no clock reads).
"""

from __future__ import annotations

import random
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
from dht.ids import ProviderInfo
from dht.providers import ProviderStore
from dht.routing_table import RoutingTable
from dht.tokens import TokenIssuer

__all__ = ["Responder"]


@dataclass(slots=True)
class Responder:
    """Replies to requests from this node's routing table and provider store."""

    node_id: bytes
    k: int
    table: RoutingTable
    store: ProviderStore
    tokens: TokenIssuer
    rng: random.Random
    tokens_refused: int = 0  # provider records refused for a bad or stale token

    def answer(self, msg: Message, source_ip: str, now: float) -> Message | None:
        """The reply to request `msg` from `source_ip` (None: not a request)."""
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
                return Ack(msg.txid, me, self._store(msg, source_ip, now), token, nodes)
        return None

    def _store(self, msg: AddProvider, source_ip: str, now: float) -> bool:
        """Keep (or, with ttl 0, drop) the sender's record; False when its token is refused."""
        if not self.tokens.check(source_ip, msg.token, now):
            self.tokens_refused += 1
            return False
        if msg.ttl == 0:  # the sender withdraws its record
            self.store.remove(msg.key, msg.sender)
            return True
        ttl = min(float(msg.ttl), float(codec.MAX_TTL))
        more_hosts = kept_more_hosts(msg.more_hosts, source_ip)
        record = ProviderInfo(msg.sender, source_ip, msg.port, msg.state, more_hosts)
        return self.store.add(msg.key, record, now + ttl)
