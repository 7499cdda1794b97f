"""Virtual clocks for tests that run real loopback sockets on trio's MockClock.

Why one place: the autojump threshold is a trade.  Every jump of virtual time costs the threshold
in real time (a test whose timers fire a hundred times waits a hundred thresholds), and too small
a threshold lets time jump while work outside the event loop is still under way.  Loopback socket
I/O is not such work: the kernel has the bytes at the receiver before the sender's call returns,
so the loop is never idle while a loopback exchange is pending.  What remains is a worker thread
(`trio.to_thread`: file reads) that the scheduler has not run yet on a loaded machine; the
threshold is chosen well above such a delay.
"""

from __future__ import annotations

import trio.testing

# real seconds every task must have been idle before virtual time jumps to the next timer
LOOPBACK_AUTOJUMP = 0.05


def loopback_clock() -> trio.testing.MockClock:
    """A MockClock for tests over loopback sockets: virtual time passes only at timers, so the
    times they assert are exact on a loaded machine."""
    return trio.testing.MockClock(autojump_threshold=LOOPBACK_AUTOJUMP)
