"""Token buckets: the DHT's one rate limiter (datagrams per source IP, announce starts).

Why: one misbehaving or hostile host must not be able to make this node spend all its time decoding
and answering; everyone else keeps being served.  The same bucket paces the start of announce
jobs so a node holding many keys does not flood its peers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cachetools import LRUCache


@dataclass(slots=True)
class TokenBucket:
    """`burst` tokens at once, refilled at `rate` per second; `take(now)` spends one."""

    rate: float
    burst: float
    tokens: float = field(init=False)
    at: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def take(self, now: float) -> bool:
        if self.at is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1.0 - 1e-9:  # tolerate rounding in the refill
            return False
        self.tokens = max(0.0, self.tokens - 1.0)
        return True

    def next_token_at(self, now: float) -> float:
        """When `take` will next succeed (call right after a failed `take`)."""
        return now + max(1e-6, (1.0 - self.tokens) / self.rate)


class SourceLimiter:
    """A token bucket per source IP, for the `max_sources` most recently seen sources."""

    def __init__(self, rate: float, burst: float, max_sources: int = 4096) -> None:
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._buckets: LRUCache[str, TokenBucket] = LRUCache(maxsize=max_sources)

    def allow(self, source: str, now: float) -> bool:
        bucket = self._buckets.get(source)
        if bucket is None:
            bucket = self._buckets[source] = TokenBucket(self.rate, self.burst)
        return bucket.take(now)

    def __len__(self) -> int:
        return len(self._buckets)
