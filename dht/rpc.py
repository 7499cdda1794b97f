"""The core's requests in flight: transaction ids, the pending table, timers and the bytes sent.

Why a layer of its own: every request the core makes (a lookup's query, a bootstrap ping, an
ADD_PROVIDER, a verification ping) goes through `_request`, which pairs it with the reply it
expects and arms its timers; `dht.jobs` (lookups, announces, joins) and `dht.protocol` (answering,
replies, timeouts) build on it. Sans-IO like the rest of the core: `now` comes in, `Send` effects
go out, the heap of timers is read by the driver through `next_deadline`.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import os
import random
from dataclasses import dataclass

from cachetools import LRUCache

from dht import codec
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
from dht.config import ProtocolConfig
from dht.effects import Effect, Send
from dht.ids import Contact
from dht.responder import fit

# what a pending RPC is for
P_LOOKUP, P_EVICT_PING, P_BOOTSTRAP, P_ADD, P_MOVE, P_VERIFY = range(6)
# timer kinds
T_STALL, T_TIMEOUT, T_MAINTENANCE, T_DUE, T_PACE = range(5)

TOKEN_FRESH = 240.0  # a token we were given stays usable this long (secrets rotate every 300 s)
TOKEN_CACHE = 8192
# a ping padded so that the largest pong (with a token) fits in the size of the ping
PONG_SIZE = len(codec.encode(Pong(codec.MAX_TXID, bytes(32), bytes(8))))

_REPLY_TYPE = {Ping: Pong, FindNode: Nodes, GetProviders: Providers, AddProvider: Ack}


@dataclass(slots=True)
class Pending:
    addr: tuple[str, int]
    node_id: bytes | None
    reply_type: type
    purpose: int
    ref: int
    # an ADD_PROVIDER naming our other addresses (version 3): the plain one, sent if this times out
    plain_retry: AddProvider | None = None


class Rpcs:
    """Requests in flight. Invariant: every key of `_pending` is a txid sent and not yet answered
    or timed out; each has a T_TIMEOUT timer (and a lookup's query a T_STALL one)."""

    def __init__(self, config: ProtocolConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self.node_id = config.node_id
        # secrets and nonces: the OS's, unless the caller injects a seeded rng for determinism
        self._random_bytes = os.urandom if rng is None else rng.randbytes
        self.rng = rng or random.Random(os.urandom(16))
        self._pending: dict[int, Pending] = {}
        self._timers: list[tuple[float, int, int, int]] = []  # (when, seq, kind, ref)
        self._seq = itertools.count()
        # tokens others gave us, by their address: an announce lookup sends ADD_PROVIDER at once
        # (its ACK lists closer nodes like a FIND_NODE reply) to nodes whose token is fresh
        self._their_tokens: LRUCache[tuple[str, int], tuple[bytes, float]] = LRUCache(
            maxsize=TOKEN_CACHE
        )
        self._c = dict.fromkeys(
            (
                "rpcs_sent rpcs_received rpcs_timed_out bad_datagrams rate_limited"
                " unexpected_replies datagrams_sent datagrams_received replies_trimmed"
            ).split(),
            0,
        )

    def next_deadline(self) -> float | None:
        return self._timers[0][0] if self._timers else None

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
        self._pending[msg.txid] = Pending(
            addr, node_id, _REPLY_TYPE[type(msg)], purpose, ref, plain
        )
        self._c["rpcs_sent"] += 1
        self._send(msg, addr, out)
        if purpose == P_LOOKUP:
            self._timer(now + self.config.rpc_stall, T_STALL, msg.txid)
        self._timer(now + self.config.rpc_timeout, T_TIMEOUT, msg.txid)

    def _fresh_token(self, contact: Contact, now: float) -> bytes:
        entry = self._their_tokens.get(contact.addr)
        return entry[0] if entry is not None and now - entry[1] < TOKEN_FRESH else b""
