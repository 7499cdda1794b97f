"""The provider store: who holds which key, each (key, provider) record expiring on its own.

Why bounded: records come from the network. Each key keeps at most `max_per_key` providers and the
store at most `max_records` records; beyond that new records are refused (and counted) rather than
letting memory grow.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass

from dht.ids import ProviderInfo


@dataclass(frozen=True, slots=True)
class ProviderRecord:
    provider: ProviderInfo
    expires: float


class ProviderStore:
    def __init__(self, max_per_key: int = 256, max_records: int = 500_000) -> None:
        self.max_per_key = max_per_key
        self.max_records = max_records
        self._records: dict[bytes, dict[bytes, ProviderRecord]] = {}
        self._expiry: list[tuple[float, bytes, bytes]] = []  # lazy heap (expires, key, provider)
        self._count = 0
        self.refused = 0

    def __len__(self) -> int:
        return self._count

    def add(self, key: bytes, provider: ProviderInfo, expires: float) -> bool:
        records = self._records.get(key)
        if records is None:
            if self._count >= self.max_records:
                self.refused += 1
                return False
            records = self._records[key] = {}
        old = records.get(provider.node_id)
        if old is None:
            if len(records) >= self.max_per_key or self._count >= self.max_records:
                self.refused += 1
                if not records:
                    del self._records[key]
                return False
            self._count += 1
        records[provider.node_id] = ProviderRecord(provider, expires)
        heapq.heappush(self._expiry, (expires, key, provider.node_id))
        return True

    def remove(self, key: bytes, provider_id: bytes) -> None:
        records = self._records.get(key)
        if records is not None and records.pop(provider_id, None) is not None:
            self._count -= 1
            if not records:
                del self._records[key]

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
            _, key, provider_id = heapq.heappop(self._expiry)
            records = self._records.get(key)
            record = records.get(provider_id) if records else None
            if record is not None and record.expires <= now:
                self.remove(key, provider_id)
                dropped += 1
        # the lazy heap holds one entry per refresh; rebuild it when it is mostly stale
        if len(self._expiry) > 4 * self._count + 1024:
            self._expiry = [
                (r.expires, key, pid)
                for key, records in self._records.items()
                for pid, r in records.items()
            ]
            heapq.heapify(self._expiry)
        return dropped
