"""Per-source rate limiting of inbound datagrams (a token bucket per IP, bounded in memory).

Why: one misbehaving or hostile host must not be able to make this node spend all its time decoding
and answering; everyone else keeps being served.
"""

from __future__ import annotations

from collections import OrderedDict


class SourceLimiter:
    def __init__(self, rate: float, burst: float, max_sources: int = 4096) -> None:
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # ip -> (tokens, at)

    def allow(self, source: str, now: float) -> bool:
        entry = self._buckets.get(source)
        if entry is None:
            tokens = self.burst
            if len(self._buckets) >= self.max_sources:
                self._buckets.popitem(last=False)
        else:
            tokens = min(self.burst, entry[0] + (now - entry[1]) * self.rate)
            self._buckets.move_to_end(source)
        allowed = tokens >= 1.0
        self._buckets[source] = (tokens - 1.0 if allowed else tokens, now)
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)
