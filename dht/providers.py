"""The provider store: who holds which key, each record expiring on its own.

Why bounded, and why records are keyed by where they came from: records come from the network.  A
record sits in the slot of its source (the UDP address its ADD_PROVIDER came from), never in the
slot of the node id it names, so a datagram carrying another node's id cannot overwrite or delete
that node's record (a ttl-0 withdrawal drops only the sender's own slot).  Each key keeps at most
`max_per_key` records and at most `max_per_key_source` from one source IP; one source IP holds at
most `max_per_source` records in all, of which at most `max_claims_per_source` in-flight or claim
ones; the store holds at most `max_records`.  Beyond a bound the new record is refused (and counted)
and records of others are untouched.  Records this node keeps for itself (`quota=False`) count
towards `max_records` only.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from dataclasses import dataclass

from dht.ids import ProviderInfo, RecordState

Slot = tuple[str, int]  # (source IP, source UDP port) of the record's ADD_PROVIDER


@dataclass(frozen=True, slots=True)
class ProviderRecord:
    provider: ProviderInfo
    expires: float
    quota: bool = True  # counted against its source IP's quotas


def _is_claim(provider: ProviderInfo) -> bool:
    return provider.state is not RecordState.COMPLETE


class ProviderStore:
    def __init__(
        self,
        max_per_key: int = 256,
        max_records: int = 500_000,
        *,
        max_per_source: int = 50_000,
        max_per_key_source: int = 4,
        max_claims_per_source: int = 256,
    ) -> None:
        self.max_per_key = max_per_key
        self.max_records = max_records
        self.max_per_source = max_per_source
        self.max_per_key_source = max_per_key_source
        self.max_claims_per_source = max_claims_per_source
        self._records: dict[bytes, dict[Slot, ProviderRecord]] = {}
        self._expiry: list[tuple[float, bytes, Slot]] = []  # lazy heap (expires, key, slot)
        self._count = 0
        # invariant: for every IP, the number of quota records (and claim records) in `_records`
        # whose slot has that IP; IPs with none are absent, so these stay as small as the store
        self._per_source: Counter[str] = Counter()
        self._claims: Counter[str] = Counter()
        self.refused = 0  # records refused because a bound was reached
        self.refused_quota = 0  # of which: a per-source bound

    def __len__(self) -> int:
        return self._count

    def source_records(self, ip: str) -> int:
        """How many records from source `ip` the store holds."""
        return self._per_source.get(ip, 0)

    def add(
        self,
        key: bytes,
        provider: ProviderInfo,
        expires: float,
        source: Slot | None = None,
        *,
        quota: bool = True,
    ) -> bool:
        """Keep `provider` for `key` in the slot of `source` (default: the provider's own address)
        until `expires`; False (and nothing changes) when a bound refuses it."""
        slot = source if source is not None else (provider.host, provider.port)
        ip = slot[0]
        records = self._records.get(key)
        old = records.get(slot) if records is not None else None
        if old is None:
            full = records is not None and len(records) >= self.max_per_key
            if self._count >= self.max_records or full:
                self.refused += 1
                return False
            if quota and not self._source_allows(key, ip, provider, records):
                self.refused += 1
                self.refused_quota += 1
                return False
            if records is None:
                records = self._records[key] = {}
            self._count += 1
            if quota:
                self._per_source[ip] += 1
        elif old.quota and _is_claim(provider) and not _is_claim(old.provider):
            if self._claims.get(ip, 0) >= self.max_claims_per_source:  # a refresh into a claim
                self.refused += 1
                self.refused_quota += 1
                return False
        counted = old.quota if old is not None else quota  # a slot keeps how it was counted
        if old is not None and counted and _is_claim(old.provider):
            self._uncount_claim(ip)
        if counted and _is_claim(provider):
            self._claims[ip] += 1
        assert records is not None
        records[slot] = ProviderRecord(provider, expires, counted)
        heapq.heappush(self._expiry, (expires, key, slot))
        return True

    def _source_allows(
        self,
        key: bytes,
        ip: str,
        provider: ProviderInfo,
        records: dict[Slot, ProviderRecord] | None,
    ) -> bool:
        if self._per_source.get(ip, 0) >= self.max_per_source:
            return False
        if _is_claim(provider) and self._claims.get(ip, 0) >= self.max_claims_per_source:
            return False
        if records is not None:
            same = sum(1 for s in records if s[0] == ip)
            if same >= self.max_per_key_source:
                return False
        return True

    def _uncount_claim(self, ip: str) -> None:
        self._claims[ip] -= 1
        if self._claims[ip] <= 0:
            del self._claims[ip]

    def remove(self, key: bytes, source: Slot) -> bool:
        """Drop the record of `key` in `source`'s slot (only that one); True if there was one."""
        records = self._records.get(key)
        record = records.pop(source, None) if records is not None else None
        if record is None:
            return False
        assert records is not None
        self._count -= 1
        if record.quota:
            ip = source[0]
            self._per_source[ip] -= 1
            if self._per_source[ip] <= 0:
                del self._per_source[ip]
            if _is_claim(record.provider):
                self._uncount_claim(ip)
        if not records:
            del self._records[key]
        return True

    def get(self, key: bytes, now: float, rng: random.Random | None = None) -> list[ProviderInfo]:
        """Live providers of `key`, shuffled when `rng` is given so load spreads over them."""
        records = self._records.get(key)
        if not records:
            return []
        out = [r.provider for r in records.values() if r.expires > now]
        if rng is not None:
            rng.shuffle(out)
        return out

    def expire(self, now: float) -> int:
        """Drop every record whose time has come; returns how many were dropped."""
        dropped = 0
        while self._expiry and self._expiry[0][0] <= now:
            _, key, slot = heapq.heappop(self._expiry)
            records = self._records.get(key)
            record = records.get(slot) if records else None
            if record is not None and record.expires <= now:
                self.remove(key, slot)
                dropped += 1
        # the lazy heap holds one entry per refresh; rebuild it when it is mostly stale
        if len(self._expiry) > 4 * self._count + 1024:
            self._expiry = [
                (r.expires, key, slot)
                for key, records in self._records.items()
                for slot, r in records.items()
            ]
            heapq.heapify(self._expiry)
        return dropped
