"""The routing table: 256 k-buckets by XOR distance, favouring long-lived contacts.

Why this shape: Kademlia's observation that a node seen for long is likely to stay. A full bucket
never drops its least recently seen contact for a newcomer; it asks the caller to ping that contact
first and only evicts it when the ping fails. Newcomers wait in a bounded replacement cache.

One IP holds at most `max_per_ip` contacts (loopback excepted: test clusters share 127.0.0.1): a
host that answers from its own address under many made-up ids cannot fill the table, and with it
every lookup's first hops.  A contact's address is never changed by `seen`: a datagram from
another address carrying a known id is not proof that the node moved (anyone can write any id).
The protocol core decides when a move is proven (`dht.relocation`) and then calls `relocate`.
"""

from __future__ import annotations

import ipaddress
from collections import Counter, OrderedDict
from dataclasses import dataclass

from dht.ids import ID_BITS, Contact, as_int, bucket_index


@dataclass(slots=True)
class _Entry:
    contact: Contact
    last_seen: float
    failures: int = 0
    key: int = 0  # the id as an integer, for fast XOR

    def __post_init__(self) -> None:
        self.key = as_int(self.contact.node_id)


@dataclass(slots=True)
class Bucket:
    entries: OrderedDict[bytes, _Entry]  # least recently seen first
    replacements: OrderedDict[bytes, Contact]  # most recent last
    pinging: bytes | None = None  # the contact being pinged before a possible eviction
    touched: float = 0.0  # last lookup into this bucket's range


class RoutingTable:
    def __init__(
        self,
        self_id: bytes,
        k: int = 20,
        max_failures: int = 3,
        ping_after: float = 300.0,
        max_per_ip: int = 2,
    ) -> None:
        self.self_id = self_id
        self.k = k
        self.max_failures = max_failures
        self.ping_after = ping_after
        self.max_per_ip = max_per_ip
        self.buckets: dict[int, Bucket] = {}  # created on first use; most stay empty
        self._size = 0
        self._per_ip: Counter[str] = Counter()  # contacts (not replacements) by host
        self.refused_ip = 0  # newcomers refused: their IP holds max_per_ip contacts already

    def __len__(self) -> int:
        return self._size

    def __contains__(self, node_id: bytes) -> bool:
        bucket = self._existing(node_id)
        return bucket is not None and node_id in bucket.entries

    def get(self, node_id: bytes) -> Contact | None:
        bucket = self._existing(node_id)
        entry = bucket.entries.get(node_id) if bucket is not None else None
        return entry.contact if entry else None

    def contacts(self) -> list[Contact]:
        return [e.contact for _, b in sorted(self.buckets.items()) for e in b.entries.values()]

    def seen(self, contact: Contact, now: float) -> Contact | None:
        """Record that `contact` just spoke to us from its address.

        Returns a contact the caller should ping (the oldest of a full bucket), or None.  A known id
        speaking from another address changes nothing (see `relocate`).
        """
        i = bucket_index(self.self_id, contact.node_id)
        if i < 0:
            return None
        bucket = self._bucket(i)
        entry = bucket.entries.get(contact.node_id)
        if entry is not None:
            if entry.contact.addr != contact.addr:
                return None
            entry.last_seen = now
            entry.failures = 0
            bucket.entries.move_to_end(contact.node_id)
            if bucket.pinging == contact.node_id:
                bucket.pinging = None
            return None
        if not self._ip_allows(contact.host):
            self.refused_ip += 1
            return None
        if len(bucket.entries) < self.k:
            bucket.entries[contact.node_id] = _Entry(contact, now)
            bucket.replacements.pop(contact.node_id, None)
            self._size += 1
            self._per_ip[contact.host] += 1
            return None
        bucket.replacements.pop(contact.node_id, None)
        bucket.replacements[contact.node_id] = contact
        if len(bucket.replacements) > self.k:
            bucket.replacements.popitem(last=False)
        oldest = next(iter(bucket.entries.values()))
        if bucket.pinging is None and now - oldest.last_seen >= self.ping_after:
            # only a contact we have not heard from for a while is worth a ping (BEP 5's
            # "questionable"); a recently seen one keeps its place and the newcomer waits
            bucket.pinging = oldest.contact.node_id
            return oldest.contact
        return None

    def relocate(self, contact: Contact, now: float) -> bool:
        """Point a known id at a new address: only once the move is proven.  False if unknown."""
        bucket = self._existing(contact.node_id)
        entry = bucket.entries.get(contact.node_id) if bucket is not None else None
        if entry is None:
            return False
        self._uncount(entry.contact.host)
        self._per_ip[contact.host] += 1
        entry.contact = contact
        entry.last_seen = now
        entry.failures = 0
        return True

    def _ip_allows(self, host: str) -> bool:
        if self._per_ip.get(host, 0) < self.max_per_ip:
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def _uncount(self, host: str) -> None:
        self._per_ip[host] -= 1
        if self._per_ip[host] <= 0:
            del self._per_ip[host]

    def knows_at(self, node_id: bytes, addr: tuple[str, int]) -> bool:
        """Was `node_id` seen speaking from `addr` (a contact, or a newcomer waiting for room)?"""
        bucket = self._existing(node_id)
        if bucket is None:
            return False
        entry = bucket.entries.get(node_id)
        if entry is not None:
            return entry.contact.addr == addr
        waiting = bucket.replacements.get(node_id)
        return waiting is not None and waiting.addr == addr

    def has_room(self, node_id: bytes, host: str) -> bool:
        """Would `seen` put this unknown id at `host` straight into its bucket (not full)?"""
        i = bucket_index(self.self_id, node_id)
        if i < 0 or not self._ip_allows(host):
            return False
        bucket = self.buckets.get(i)
        return bucket is None or (node_id not in bucket.entries and len(bucket.entries) < self.k)

    def failed(self, node_id: bytes) -> None:
        """An RPC to `node_id` timed out: drop it if unreliable or if someone can replace it."""
        bucket = self._existing(node_id)
        if bucket is None:
            return
        entry = bucket.entries.get(node_id)
        if entry is None:
            bucket.replacements.pop(node_id, None)
            return
        entry.failures += 1
        if bucket.pinging == node_id or bucket.replacements or entry.failures >= self.max_failures:
            self.remove(node_id)

    def remove(self, node_id: bytes) -> None:
        bucket = self._existing(node_id)
        if bucket is None:
            return
        gone = bucket.entries.pop(node_id, None)
        if gone is None:
            bucket.replacements.pop(node_id, None)
            return
        self._size -= 1
        self._uncount(gone.contact.host)
        if bucket.pinging == node_id:
            bucket.pinging = None
        while bucket.replacements:
            _, newcomer = bucket.replacements.popitem(last=True)
            if self._ip_allows(newcomer.host):
                bucket.entries[newcomer.node_id] = _Entry(newcomer, 0.0)
                self._size += 1
                self._per_ip[newcomer.host] += 1
                break

    def closest(self, target: bytes, count: int, exclude: bytes | None = None) -> list[Contact]:
        """The `count` known contacts nearest to `target` by XOR distance."""
        t = as_int(target)
        found: list[tuple[int, Contact]] = []
        buckets = self.buckets
        # the bucket `target` falls in holds the nearest; all buckets below it are in one distance
        # band (sorted below); each bucket above it is strictly farther than everything before it
        start = bucket_index(self.self_id, target)
        filled = sorted(i for i, b in buckets.items() if b.entries)
        order = [i for i in filled if i == start]
        order += [i for i in filled if i < start]
        boundary = len(order) if start >= 0 else 0
        order += [i for i in filled if i > start]
        for n, i in enumerate(order):
            if n >= boundary and len(found) >= count:
                break
            for node_id, entry in buckets[i].entries.items():
                if node_id != exclude:
                    found.append((entry.key ^ t, entry.contact))
        found.sort(key=lambda pair: pair[0])
        return [c for _, c in found[:count]]

    def touch(self, target: bytes, now: float) -> None:
        i = bucket_index(self.self_id, target)
        if i >= 0:
            self._bucket(i).touched = now

    def stale_buckets(self, now: float, older_than: float) -> list[int]:
        """Indices of buckets worth refreshing: not looked into for `older_than` seconds, from the
        nearest non-empty bucket outwards (nearer ones cannot hold anybody)."""
        filled = [i for i, b in self.buckets.items() if b.entries]
        if not filled:
            return []
        stale = []
        for i in range(min(filled), ID_BITS):
            bucket = self.buckets.get(i)
            if now - (bucket.touched if bucket is not None else 0.0) >= older_than:
                stale.append(i)
        return stale

    def _existing(self, node_id: bytes) -> Bucket | None:
        """The bucket `node_id` falls into, if it was ever created (never for our own id)."""
        return self.buckets.get(bucket_index(self.self_id, node_id))

    def _bucket(self, i: int) -> Bucket:
        bucket = self.buckets.get(i)
        if bucket is None:
            bucket = self.buckets[i] = Bucket(OrderedDict(), OrderedDict())
        return bucket
