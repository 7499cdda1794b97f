"""The wire format: versioned msgpack arrays, one message per UDP datagram, validated field by
field.

Why strict: every datagram is untrusted input. `decode` either returns a well-typed message or
raises `DecodeError`, never anything else, so the protocol core can count and drop bad input in one
place. Replies that carry lists (nodes, providers) are trimmed so the datagram stays under
`MAX_PAYLOAD` bytes.

Layout: ``[version, kind, txid, sender_id, *fields]``; with a cluster pre-shared key the datagram is
``payload || HMAC-SHA256(psk, payload)[:16]``. Contacts and providers are ``[id, packed ip, port]``;
a provider entry with the unspecified IP (0.0.0.0 or ::) and the replier's own id means "the
replier itself, at the address this reply came from" (a node does not know its own outside address).

Version 2 adds record states (`dht.ids.RecordState`): its provider entries are
``[id, packed ip, port, state]`` and its ADD_PROVIDER carries a trailing state, with ttl 0 meaning
"drop my record of this key". Every other kind is the same in both versions. A message is sent as
version 1 whenever it carries no state other than COMPLETE, so nodes that only speak version 1 keep
understanding everything except in-flight and claim records (which they drop as bad datagrams).

Version 3 adds a node's other addresses (`dht.addresses`): only ADD_PROVIDER has it, as version 2
plus a trailing list of up to four packed IPs, sent only by a node configured with several
addresses.  PROVIDERS keeps its version-1/2 layout: a record with several addresses is one entry
per address (same id, port and state); the requester groups them again (`dht.protocol`).

Version 4 is PING, FIND_NODE and GET_PROVIDERS only: version 1 plus a trailing `proof`, either the
write token the receiver gave the sender's IP (it proves the sender receives at that address) or
padding, so that the request is at least as large as the largest reply it may get.  A node answers
a request whose source has not proven its address (no MAC, no valid token) with a reply no larger
than the request (`dht.responder`): padding makes the full answer fit, and a reflected datagram is
never larger than the one that caused it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import socket
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import msgpack

from dht.addresses import MAX_MORE_HOSTS, each_address
from dht.ids import ID_BYTES, Contact, ProviderInfo, RecordState

VERSION = 1
VERSION_STATES = 2  # provider entries and ADD_PROVIDER carry a RecordState
VERSION_ADDRESSES = 3  # ADD_PROVIDER also names the sender's other addresses
VERSION_PROOF = 4  # PING, FIND_NODE, GET_PROVIDERS carry a proof (token or padding)
MAX_PAYLOAD = 1200  # what we send, before the optional MAC
MAX_DATAGRAM = 1400  # what we accept at all
MAC_BYTES = 16
TOKEN_MAX = 32
MAX_TXID = 2**32 - 1
MAX_TTL = 24 * 3600


class DecodeError(ValueError):
    """The datagram is not a valid message of this protocol."""


class Kind(IntEnum):
    PING = 1
    PONG = 2
    FIND_NODE = 3
    NODES = 4
    GET_PROVIDERS = 5
    PROVIDERS = 6
    ADD_PROVIDER = 7
    ACK = 8


@dataclass(frozen=True, slots=True)
class Ping:
    txid: int
    sender: bytes
    proof: bytes = b""  # (version 4) the receiver's token for our IP, or padding


@dataclass(frozen=True, slots=True)
class Pong:
    txid: int
    sender: bytes
    token: bytes


@dataclass(frozen=True, slots=True)
class FindNode:
    txid: int
    sender: bytes
    target: bytes
    proof: bytes = b""  # (version 4) the receiver's token for our IP, or padding


@dataclass(frozen=True, slots=True)
class Nodes:
    txid: int
    sender: bytes
    token: bytes
    nodes: tuple[Contact, ...]


@dataclass(frozen=True, slots=True)
class GetProviders:
    txid: int
    sender: bytes
    key: bytes
    offset: int
    proof: bytes = b""  # (version 4) the receiver's token for our IP, or padding


@dataclass(frozen=True, slots=True)
class Providers:
    txid: int
    sender: bytes
    token: bytes
    providers: tuple[ProviderInfo, ...]
    more: bool  # the responder holds more providers than fit; ask again with a larger offset
    nodes: tuple[Contact, ...]


@dataclass(frozen=True, slots=True)
class AddProvider:
    txid: int
    sender: bytes
    key: bytes
    port: int  # the sender's registry port; its IP is the datagram's source address
    ttl: int  # 0 (version 2 only): drop the sender's record of `key`
    token: bytes
    state: RecordState = RecordState.COMPLETE
    more_hosts: tuple[str, ...] = ()  # (version 3) other IPs the sender's registry answers on


@dataclass(frozen=True, slots=True)
class Ack:
    txid: int
    sender: bytes
    stored: bool
    token: bytes = b""  # a fresh token, so a refused ADD_PROVIDER can be retried
    nodes: tuple[Contact, ...] = ()  # the replier's nearest to the key: an ADD is also a query


Request = Ping | FindNode | GetProviders | AddProvider
Reply = Pong | Nodes | Providers | Ack
Message = Request | Reply

REQUEST_TYPES = (Ping, FindNode, GetProviders, AddProvider)


# -- framing -------------------------------------------------------------------------------------


def seal(payload: bytes, psk: bytes | None) -> bytes:
    if psk is None:
        return payload
    return payload + hmac.new(psk, payload, hashlib.sha256).digest()[:MAC_BYTES]


def unseal(data: bytes, psk: bytes | None) -> bytes:
    if len(data) > MAX_DATAGRAM:
        raise DecodeError("datagram too large")
    if psk is None:
        return data
    if len(data) <= MAC_BYTES:
        raise DecodeError("datagram too short for a MAC")
    payload, mac = data[:-MAC_BYTES], data[-MAC_BYTES:]
    expected = hmac.new(psk, payload, hashlib.sha256).digest()[:MAC_BYTES]
    if not hmac.compare_digest(mac, expected):
        raise DecodeError("bad MAC")
    return payload


# -- addresses -----------------------------------------------------------------------------------


# memos of pure functions (bounded): shared by every node in the process, never changing an answer
@functools.lru_cache(maxsize=8192)
def pack_ip(host: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)


def unpack_ip(raw: object) -> str:
    if type(raw) is not bytes:
        raise DecodeError("ip must be bytes")
    return _unpack_ip(raw)


@functools.lru_cache(maxsize=8192)
def _unpack_ip(raw: bytes) -> str:
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw)
    if len(raw) == 16:
        return socket.inet_ntop(socket.AF_INET6, raw)
    raise DecodeError("ip must be 4 or 16 bytes")


def _entry_size(ip: bytes, port: int, with_state: bool) -> int:
    # fixarray(3|4) + bin8 id + bin8 ip + uint port [+ fixint state], exactly as msgpack packs them
    port_size = 1 if port < 128 else 2 if port < 256 else 3
    return 1 + 2 + ID_BYTES + 2 + len(ip) + port_size + (1 if with_state else 0)


# -- encoding ------------------------------------------------------------------------------------


def _entries(
    items: tuple[Contact, ...] | tuple[ProviderInfo, ...], budget: int, with_state: bool = False
) -> tuple[list[list[Any]], int]:
    out: list[list[Any]] = []
    used = 0
    for item in items:
        try:
            ip = pack_ip(item.host)
        except OSError:
            continue  # not an IP literal we can put on the wire (e.g. a scoped IPv6 address)
        size = _entry_size(ip, item.port, with_state)
        extra = 2 if len(out) == 15 else 0  # list header grows from fixarray to array16
        if used + size + extra > budget:
            break
        entry: list[Any] = [item.node_id, ip, item.port]
        if with_state and isinstance(item, ProviderInfo):
            entry.append(int(item.state))
        out.append(entry)
        used += size + extra
    return out, used


def encode(msg: Message, max_payload: int = MAX_PAYLOAD) -> bytes:
    """Pack a message; nodes/providers lists are trimmed so the result fits in `max_payload`
    (at most MAX_PAYLOAD) if the rest of the message does."""
    max_payload = min(max_payload, MAX_PAYLOAD)
    head: list[Any] = [VERSION]
    match msg:
        case Ping():
            body = [Kind.PING, msg.txid, msg.sender]
        case Pong():
            body = [Kind.PONG, msg.txid, msg.sender, msg.token]
        case FindNode():
            body = [Kind.FIND_NODE, msg.txid, msg.sender, msg.target]
        case GetProviders():
            body = [Kind.GET_PROVIDERS, msg.txid, msg.sender, msg.key, msg.offset]
        case AddProvider():
            body = [Kind.ADD_PROVIDER, msg.txid, msg.sender, msg.key, msg.port, msg.ttl, msg.token]
            if msg.more_hosts:
                head = [VERSION_ADDRESSES]
                body.append(int(msg.state))
                body.append([pack_ip(h) for h in msg.more_hosts[:MAX_MORE_HOSTS]])
            elif msg.state is not RecordState.COMPLETE or msg.ttl == 0:
                head = [VERSION_STATES]
                body.append(int(msg.state))
        case Ack():
            base = len(
                msgpack.packb([VERSION, Kind.ACK, msg.txid, msg.sender, msg.stored, msg.token, []])
            )
            nodes, _ = _entries(msg.nodes, max_payload - base - 2)
            body = [Kind.ACK, msg.txid, msg.sender, msg.stored, msg.token, nodes]
        case Nodes():
            base = len(msgpack.packb([VERSION, Kind.NODES, msg.txid, msg.sender, msg.token, []]))
            nodes, _ = _entries(msg.nodes, max_payload - base - 2)
            body = [Kind.NODES, msg.txid, msg.sender, msg.token, nodes]
        case Providers():
            base = len(
                msgpack.packb(
                    [VERSION, Kind.PROVIDERS, msg.txid, msg.sender, msg.token, [], True, []]
                )
            )
            budget = max_payload - base - 4
            with_state = any(p.state is not RecordState.COMPLETE for p in msg.providers)
            if with_state:
                head = [VERSION_STATES]
            entries = each_address(msg.providers)
            providers, used = _entries(entries, budget, with_state)
            more = msg.more or len(providers) < len(entries)
            nodes, _ = _entries(msg.nodes, budget - used)
            body = [Kind.PROVIDERS, msg.txid, msg.sender, msg.token, providers, more, nodes]
    if isinstance(msg, (Ping, FindNode, GetProviders)) and msg.proof:
        head = [VERSION_PROOF]
        body.append(msg.proof)
    return msgpack.packb(head + body)  # type: ignore[no-any-return]


def padded(msg: Ping | FindNode | GetProviders, size: int) -> Ping | FindNode | GetProviders:
    """`msg` (version 4) with zero padding as its proof, encoding to at least `size` bytes."""
    n = max(1, size - len(encode(dataclasses.replace(msg, proof=b"\0"))) + 1)
    while True:
        out = dataclasses.replace(msg, proof=bytes(n))
        if len(encode(out)) >= size:
            return out
        n += 1  # the proof's length header grew (bin8 -> bin16)


# -- decoding ------------------------------------------------------------------------------------


def _id(raw: object, what: str) -> bytes:
    if type(raw) is not bytes or len(raw) != ID_BYTES:
        raise DecodeError(f"{what} must be {ID_BYTES} bytes")
    return raw


def _uint(raw: object, what: str, low: int, high: int) -> int:
    if type(raw) is not int or not low <= raw <= high:
        raise DecodeError(f"{what} must be an integer in [{low}, {high}]")
    return raw


def _token(raw: object) -> bytes:
    if type(raw) is not bytes or len(raw) > TOKEN_MAX:
        raise DecodeError("token must be at most 32 bytes")
    return raw


def _bool(raw: object, what: str) -> bool:
    if type(raw) is not bool:
        raise DecodeError(f"{what} must be a boolean")
    return raw


def _triples(raw: object, what: str) -> list[tuple[bytes, str, int]]:
    if type(raw) is not list:
        raise DecodeError(f"{what} must be a list")
    out = []
    for entry in raw:
        if type(entry) is not list or len(entry) != 3:
            raise DecodeError(f"{what} entries must be [id, ip, port]")
        out.append((_id(entry[0], "id"), unpack_ip(entry[1]), _uint(entry[2], "port", 1, 65535)))
    return out


def _state(raw: object) -> RecordState:
    if type(raw) is not int:
        raise DecodeError("state must be an integer")
    try:
        return RecordState(raw)
    except ValueError:
        raise DecodeError(f"unknown record state {raw}") from None


def _more_hosts(raw: object) -> tuple[str, ...]:
    if type(raw) is not list or len(raw) > MAX_MORE_HOSTS:
        raise DecodeError(f"addresses must be a list of at most {MAX_MORE_HOSTS}")
    return tuple(unpack_ip(ip) for ip in raw)


def _providers(raw: object, version: int) -> tuple[ProviderInfo, ...]:
    if version == VERSION:
        return tuple(ProviderInfo(*t) for t in _triples(raw, "providers"))
    if type(raw) is not list:
        raise DecodeError("providers must be a list")
    out = []
    for entry in raw:
        if type(entry) is not list or len(entry) != 4:
            raise DecodeError("providers entries must be [id, ip, port, state]")
        out.append(
            ProviderInfo(
                _id(entry[0], "id"),
                unpack_ip(entry[1]),
                _uint(entry[2], "port", 1, 65535),
                _state(entry[3]),
            )
        )
    return tuple(out)


_VERSIONS = (VERSION, VERSION_STATES, VERSION_ADDRESSES, VERSION_PROOF)
_PROVING = (Kind.PING, Kind.FIND_NODE, Kind.GET_PROVIDERS)


def _proof(raw: object) -> bytes:
    if type(raw) is not bytes or not raw:
        raise DecodeError("proof must be non-empty bytes")
    return raw


_ARITY = {
    Kind.PING: 4,
    Kind.PONG: 5,
    Kind.FIND_NODE: 5,
    Kind.NODES: 6,
    Kind.GET_PROVIDERS: 6,
    Kind.PROVIDERS: 8,
    Kind.ADD_PROVIDER: 8,
    Kind.ACK: 7,
}


def decode(payload: bytes) -> Message:
    """Parse and validate one payload (MAC already checked); raise DecodeError on anything wrong."""
    if len(payload) > MAX_DATAGRAM:
        raise DecodeError("datagram too large")
    try:
        obj = msgpack.unpackb(
            payload,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=256,
            max_bin_len=MAX_DATAGRAM,
            max_array_len=64,
            max_map_len=16,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo of exception types on garbage
        raise DecodeError(f"not msgpack: {type(exc).__name__}") from None
    if type(obj) is not list or len(obj) < 4:
        raise DecodeError("message must be an array of at least 4 items")
    if type(obj[0]) is not int or obj[0] not in _VERSIONS:
        raise DecodeError(f"unsupported version: {obj[0]!r}")
    version: int = obj[0]
    if type(obj[1]) is not int:
        raise DecodeError("message kind must be an integer")
    try:
        kind = Kind(obj[1])
    except ValueError:
        raise DecodeError("unknown message kind") from None
    if version == VERSION_ADDRESSES and kind is not Kind.ADD_PROVIDER:
        raise DecodeError(f"{kind.name} has no version {version}")
    if version == VERSION_PROOF and kind not in _PROVING:
        raise DecodeError(f"{kind.name} has no version {version}")
    arity = _ARITY[kind]
    if kind is Kind.ADD_PROVIDER:
        arity += {VERSION_STATES: 1, VERSION_ADDRESSES: 2}.get(version, 0)
    elif version == VERSION_PROOF:
        arity += 1
    if len(obj) != arity:
        raise DecodeError(f"{kind.name} must have {arity} items in version {version}")
    txid = _uint(obj[2], "txid", 0, MAX_TXID)
    sender = _id(obj[3], "sender")
    proof = _proof(obj[-1]) if version == VERSION_PROOF else b""
    match kind:
        case Kind.PING:
            return Ping(txid, sender, proof)
        case Kind.PONG:
            return Pong(txid, sender, _token(obj[4]))
        case Kind.FIND_NODE:
            return FindNode(txid, sender, _id(obj[4], "target"), proof)
        case Kind.NODES:
            nodes = tuple(Contact(*t) for t in _triples(obj[5], "nodes"))
            return Nodes(txid, sender, _token(obj[4]), nodes)
        case Kind.GET_PROVIDERS:
            offset = _uint(obj[5], "offset", 0, 2**20)
            return GetProviders(txid, sender, _id(obj[4], "key"), offset, proof)
        case Kind.PROVIDERS:
            providers = _providers(obj[5], version)
            nodes = tuple(Contact(*t) for t in _triples(obj[7], "nodes"))
            return Providers(txid, sender, _token(obj[4]), providers, _bool(obj[6], "more"), nodes)
        case Kind.ADD_PROVIDER:
            if version == VERSION:
                ttl, state = _uint(obj[6], "ttl", 1, MAX_TTL), RecordState.COMPLETE
            else:
                ttl, state = _uint(obj[6], "ttl", 0, MAX_TTL), _state(obj[8])
            more_hosts = _more_hosts(obj[9]) if version == VERSION_ADDRESSES else ()
            return AddProvider(
                txid,
                sender,
                _id(obj[4], "key"),
                _uint(obj[5], "port", 1, 65535),
                ttl,
                _token(obj[7]),
                state,
                more_hosts,
            )
        case Kind.ACK:
            nodes = tuple(Contact(*t) for t in _triples(obj[6], "nodes"))
            return Ack(txid, sender, _bool(obj[4], "stored"), _token(obj[5]), nodes)
    raise DecodeError("unknown message kind")  # pragma: no cover - the match is exhaustive
