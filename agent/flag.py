"""A boolean that tasks can await becoming true.

Why: readiness is a condition over several services (containerd connected, state advertised, DHT
joined).  Each input is a `Flag` its owner sets; whoever needs "ready" awaits the flags instead of
polling them on a timer.
"""

from __future__ import annotations

import trio


class Flag:
    """`set(True/False)` by its owner; `await wait()` returns once it is true."""

    def __init__(self, value: bool = False) -> None:
        self._value = value
        self._waiters = trio.lowlevel.ParkingLot()

    def __bool__(self) -> bool:
        return self._value

    def __repr__(self) -> str:
        return f"Flag({self._value})"

    def set(self, value: bool = True) -> None:
        self._value = value
        if value:
            self._waiters.unpark_all()

    async def wait(self) -> None:
        """Return once the flag is true (at once, after a checkpoint, when it already is)."""
        if self._value:
            await trio.lowlevel.checkpoint()
            return
        while not self._value:
            await self._waiters.park()
