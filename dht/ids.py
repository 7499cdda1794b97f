"""Identifiers, the XOR metric and the small records every other DHT module passes around.

Why a module of its own: ids, distances and contact records are the vocabulary of the codec, the
routing table, the lookup and the provider store; keeping them here lets those modules stay
independent.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from enum import IntEnum

ID_BYTES = 32
ID_BITS = ID_BYTES * 8


def key_id(key: str) -> bytes:
    """The 256-bit DHT id of a key string (a digest like `sha256:...` or a `registry/repo:tag`)."""
    return hashlib.sha256(key.encode("utf-8")).digest()


def as_int(node_id: bytes) -> int:
    return int.from_bytes(node_id, "big")


def distance(a: bytes, b: bytes) -> int:
    """Kademlia's XOR distance between two ids."""
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


def bucket_index(self_id: bytes, other: bytes) -> int:
    """Index of the k-bucket `other` falls into: floor(log2(distance)); -1 for the id itself."""
    return distance(self_id, other).bit_length() - 1


def random_id_in_bucket(self_id: bytes, index: int, rng: random.Random) -> bytes:
    """A random id whose distance from `self_id` lies in [2**index, 2**(index+1))."""
    if not 0 <= index < ID_BITS:
        raise ValueError(f"bucket index out of range: {index}")
    offset = (1 << index) | rng.getrandbits(index) if index else 1
    return (as_int(self_id) ^ offset).to_bytes(ID_BYTES, "big")


def random_node_id(rng: random.Random) -> bytes:
    return rng.getrandbits(ID_BITS).to_bytes(ID_BYTES, "big")


@dataclass(frozen=True, slots=True)
class Contact:
    """Another DHT node: its id and the UDP address it speaks from."""

    node_id: bytes
    host: str
    port: int

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)


class RecordState(IntEnum):
    """What a provider record says about the provider's copy of the key (its wire value).

    COMPLETE: the provider holds the content. INFLIGHT: the provider is receiving it right now and
    serves the prefix that has arrived (a reader must verify and may have to wait). CLAIM: the
    provider is about to fetch it from upstream and serves nothing yet.
    """

    COMPLETE = 0
    INFLIGHT = 1
    CLAIM = 2


@dataclass(frozen=True, slots=True)
class ProviderInfo:
    """A node that holds a key: its id, IP and registry (HTTP) port, and its record's state.

    `more_hosts`: other IPs the node is reachable on (`dht.addresses`), `host` being the one its
    record came from."""

    node_id: bytes
    host: str
    port: int
    state: RecordState = RecordState.COMPLETE
    more_hosts: tuple[str, ...] = ()

    @property
    def hosts(self) -> tuple[str, ...]:
        return (self.host, *self.more_hosts)
