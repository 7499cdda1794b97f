"""How long to wait for a peer's answer before asking another one too (the hedge delay).

Why its own module: the delay is a small decision over recent history, kept pure (no clock, no
I/O) so it can be tested exactly; `registry.mirror.peer_race` performs it.  A peer that accepts
connections but never answers (a frozen process, a node under memory pressure) would otherwise
cost a whole `response_timeout` (2 s) before fail-over; with hedging it costs one hedge delay.

The delay is a high quantile (`quantile`, p90) of the last `window` times from sending a request to
a peer to having its first body bytes (its response head, for HEAD and empty bodies), clamped to
[`floor`, `ceiling`]: on a healthy cluster peers answer in a few milliseconds, so the floor (50 ms,
as Spegel's resilient hedging) is what counts; when every peer is slow the quantile grows and
hedges stop doubling load, but never beyond the ceiling (well under a second).  With no history
yet the floor is used.  Samples from in-flight providers are left out: their first bytes may wait
on their own upstream download.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

__all__ = ["HedgeDelay", "HedgePolicy"]


@dataclass(frozen=True, slots=True)
class HedgePolicy:
    floor: float = 0.050
    ceiling: float = 0.500
    quantile: float = 0.9
    window: int = 64

    def __post_init__(self) -> None:
        if not 0 < self.floor <= self.ceiling or not math.isfinite(self.ceiling):
            raise ValueError("hedge delay needs 0 < floor <= ceiling (finite seconds)")
        if not 0 < self.quantile <= 1 or self.window < 1:
            raise ValueError("hedge quantile must be in (0, 1] and the window at least 1")


class HedgeDelay:
    """Recent time-to-answer samples and the hedge delay they give."""

    def __init__(self, policy: HedgePolicy | None = None) -> None:
        self.policy = policy or HedgePolicy()
        self._samples: deque[float] = deque(maxlen=self.policy.window)

    def observe(self, seconds: float) -> None:
        """A peer answered (first body bytes) `seconds` after it was asked."""
        if seconds >= 0 and math.isfinite(seconds):
            self._samples.append(seconds)

    def current(self) -> float:
        """Seconds to wait for an answer before a second provider is asked too."""
        policy = self.policy
        if not self._samples:
            return policy.floor
        ordered = sorted(self._samples)
        index = min(len(ordered) - 1, math.ceil(policy.quantile * len(ordered)) - 1)
        return min(policy.ceiling, max(policy.floor, ordered[index]))
