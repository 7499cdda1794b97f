"""Waiting for a provider when a half-sent blob body has lost all of its sources.

Why: containerd re-requests a cut body from the byte it got to (a Range request, to the mirror
first, then upstream), but only a few times in a row without progress, and the re-request costs a
fresh lookup or an upstream fetch of the rest.  So once a response head has gone out the mirror
tries a little harder than a fresh request would: every `interval` it runs a fresh lookup with a
fresh budget of attempts, for up to `patience`, before the body is cut.  What it waits for is a
provider's agent restarting (a DaemonSet rolls it) or an in-flight provider whose record arrives
late.  It stops early when `hopeless` says the providers there are cannot serve it at all (their
own downloads have no source, or come from this node: `registry.burst.own_downloads`): waiting
longer would not help, and the cut lets containerd's next request go through a claim.  The
mirror run says how one attempt opens a transfer; this loop only paces the attempts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from registry.burst.attempts import GiveUp
from registry.burst.supply import Supply
from registry.mirror.peer_answer import PeerBusy

__all__ = ["RefusalRounds", "wait_for_provider"]

T = TypeVar("T")


async def wait_for_provider(
    new_supply: Callable[[], Supply],
    attempt: Callable[[Supply], Awaitable[T | GiveUp]],
    *,
    patience: float,
    interval: float,
    hopeless: Callable[[], bool] | None = None,
) -> T | None:
    """`attempt(supply)` with a fresh supply (`new_supply()`: a fresh lookup) every `interval`
    until one opens a transfer (its result) or `patience` is over (None)."""
    deadline = trio.current_time() + patience
    while trio.current_time() + interval < deadline:
        await trio.sleep(interval)
        async with trio.open_nursery() as nursery:
            supply = new_supply()
            supply.start(nursery)
            result = await attempt(supply)
            nursery.cancel_scope.cancel()
        if not isinstance(result, GiveUp):
            return result
        if hopeless is not None and hopeless():
            return None  # the providers there are cannot help (registry.burst.own_downloads)
    return None


class RefusalRounds:
    """While a half-sent body waits for a provider: whether the providers there are all refuse
    for good reason ("no-source" or "loop", `registry.burst.own_downloads`) round after round.
    Then the body is cut at once rather than after `resume_patience`: containerd resumes it
    through a fresh request, whose claim sends one node upstream for the rest."""

    ROUNDS = 2  # rounds in a row with only such refusals (a round is `resume_interval` apart)

    def __init__(self) -> None:
        self.refused = 0  # this round: peers that cannot serve it now
        self.busy = 0  # this round: peers merely at their upload limit (worth waiting for)
        self.hopeless_rounds = 0

    def new_round(self) -> None:
        if self.refused and not self.busy:
            self.hopeless_rounds += 1
        elif self.refused or self.busy:
            self.hopeless_rounds = 0
        self.refused = self.busy = 0

    def count(self, busy: PeerBusy) -> None:
        if busy.refused:
            self.refused += 1
        else:
            self.busy += 1

    def hopeless(self) -> bool:
        return self.hopeless_rounds + (1 if self.refused and not self.busy else 0) >= self.ROUNDS
