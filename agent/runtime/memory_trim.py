"""Give the heap a burst of requests left behind back to the kernel once the agent goes quiet.

Why: under load (hundreds of connections, each with its parser state, read buffers and tasks) the
agent's heap grows.  When the load ends Python frees those objects, but glibc's malloc keeps the
freed pages inside its arenas (the main heap and one per worker thread that allocated), so RSS
would stay above idle for as long as the agent runs (docs/decisions/idle-heap-trim.md has the
figures and the command that measures them).  `malloc_trim(0)` hands the free pages of every arena
back.  It walks the heaps, so it is not run on a timer but once per quiet
spell: `quiet_s` seconds after the last new request, if requests arrived since the last trim.
Linux with glibc only; elsewhere (musl, macOS) the trimmer does nothing.

`IdleTrim` is the decision (pure, tested with plain numbers); `trim_when_idle` is the Trio driver.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import trio

__all__ = ["IdleTrim", "glibc_malloc_trim", "resident_bytes", "trim_when_idle"]

logger = logging.getLogger(__name__)

QUIET_S = 5.0  # seconds without a new request before the heap is trimmed
CHECK_EVERY_S = 1.0


@dataclass(slots=True)
class IdleTrim:
    """Says when to trim: once per quiet spell that follows activity.

    `observe(now, count)` is fed a monotonically growing request count; it answers True once when
    the count has not moved for `quiet_s` seconds and has moved since the last trim (so an idle
    agent is never trimmed twice in a row, and a busy one is never trimmed while requests keep
    arriving).  The spell after start-up counts as activity: the first quiet spell trims once.
    """

    quiet_s: float
    _count: int | None = None
    _changed_at: float = 0.0
    _trimmed_count: int | None = None

    def observe(self, now: float, count: int) -> bool:
        if count != self._count:
            self._count, self._changed_at = count, now
            return False
        if count == self._trimmed_count or now - self._changed_at < self.quiet_s:
            return False
        self._trimmed_count = count
        return True


def glibc_malloc_trim() -> Callable[[], object] | None:
    """glibc's `malloc_trim(0)`, or None where the C library has none (non-Linux, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


def resident_bytes() -> int:
    """This process's RSS (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


async def trim_when_idle(
    requests_seen: Callable[[], int],
    *,
    trim: Callable[[], object] | None,
    quiet_s: float = QUIET_S,
    check_every_s: float = CHECK_EVERY_S,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Forever: trim the heap once `quiet_s` after each burst of requests (`requests_seen` is a
    running count).  Returns at once when `trim` is None (no glibc)."""
    task_status.started()
    if trim is None:
        logger.debug("no malloc_trim in this C library; idle heap trimming off")
        return
    policy = IdleTrim(quiet_s)
    while True:
        await trio.sleep(check_every_s)
        if not policy.observe(trio.current_time(), requests_seen()):
            continue
        before = resident_bytes()
        trim()
        after = resident_bytes()
        logger.info(
            "idle: heap trimmed",
            extra={
                "rss_before_mib": round(before / 2**20, 1),
                "rss_after_mib": round(after / 2**20, 1),
                "python_blocks": sys.getallocatedblocks(),
            },
        )
