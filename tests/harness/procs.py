"""Start and stop the harness's own daemons, by PID only.

Why: tests and ``hack/cluster`` start containerd, registries and agents; teardown must stop exactly
those processes and nothing else, also from another process (``hack/cluster down``) that did not
start them.  A process is identified by (pid, start time from /proc/PID/stat), so a reused PID is
never signalled; whether it has exited is judged from /proc/PID/status (gone or zombie).

API
- ``Daemon.start(argv, log_path, netns=None, env=None)`` -> ``Daemon`` (``pid``, ``start_time``,
  ``log_path``, ``alive()``, ``stop(timeout)``, ``kill()``, ``record()`` -> dict for a state file,
  ``Daemon.from_record(d)``); ``Daemon.adopt(name, pid, log_path)`` records a process someone
  else started for the harness (a container's) the same way.
- ``stop_recorded(record, timeout)``: stop a daemon described by ``Daemon.record()`` output.
- Every running daemon is also recorded under ``leftovers_dir()`` until it is stopped, so
  ``stop_leftover_daemons()`` (``hack/cluster down --all``) can stop what a killed run left.
- ``is_alive(pid, start_time=None)``, ``process_start_time(pid)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def state_root() -> Path:
    """Where the harness keeps pointers to what it runs, across processes."""
    return Path(tempfile.gettempdir()) / "spegla-clusters"


def leftovers_dir() -> Path:
    return state_root() / "daemons"


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks after boot), or None if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    rest = stat.rsplit(")", 1)[1].split()
    return int(rest[19])


def _state(pid: int) -> str | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.split()[1]
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def is_alive(pid: int, start_time: int | None = None) -> bool:
    """True if PID runs (not a zombie) and, if given, started at ``start_time``."""
    state = _state(pid)
    if state is None or state in ("Z", "X"):
        return False
    return start_time is None or process_start_time(pid) == start_time


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _wait_gone(pid: int, start_time: int | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not is_alive(pid, start_time):
            return True
        time.sleep(0.02)
    return not is_alive(pid, start_time)


def stop_pid(pid: int, start_time: int | None, timeout: float = 5.0) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL; only if the pid is still the same process."""
    if not is_alive(pid, start_time):
        _reap(pid)
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if _wait_gone(pid, start_time, timeout):
        return
    if is_alive(pid, start_time):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _wait_gone(pid, start_time, 5.0)


@dataclass(slots=True)
class Daemon:
    """A process this harness started (optionally inside a network namespace)."""

    name: str
    argv: list[str]
    log_path: Path
    pid: int
    start_time: int | None
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @classmethod
    def start(
        cls,
        name: str,
        argv: list[str],
        log_path: Path,
        netns: str | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Daemon:
        full = (["ip", "netns", "exec", netns] if netns else []) + argv
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            # `ip netns exec` execs the command, so the PID is the daemon's own
            popen = subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                cwd=cwd,
                start_new_session=True,  # a Ctrl-C in the terminal goes to us, not the daemons
            )
        d = cls(name, full, log_path, popen.pid, process_start_time(popen.pid), popen)
        leftovers_dir().mkdir(parents=True, exist_ok=True)
        d._pointer().write_text(json.dumps(d.record()))
        return d

    @classmethod
    def adopt(cls, name: str, pid: int, log_path: Path) -> Daemon:
        """A process started by someone else for the harness (a container's process or its shim,
        started by containerd), recorded like the harness's own so a killed run's leftovers are
        found; ``stop()`` stops and forgets it."""
        d = cls(name, [], log_path, pid, process_start_time(pid))
        leftovers_dir().mkdir(parents=True, exist_ok=True)
        d._pointer().write_text(json.dumps(d.record()))
        return d

    def _pointer(self) -> Path:
        return leftovers_dir() / f"{self.pid}-{self.start_time}.json"

    def alive(self) -> bool:
        if self.popen is not None and self.popen.poll() is not None:
            return False
        return is_alive(self.pid, self.start_time)

    def stop(self, timeout: float = 5.0) -> None:
        stop_pid(self.pid, self.start_time, timeout)
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=1)
        self._pointer().unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL at once (to simulate a crash)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        stop_pid(self.pid, self.start_time, 1.0)
        self._pointer().unlink(missing_ok=True)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "argv": self.argv, "pid": self.pid,
                "start_time": self.start_time, "log": str(self.log_path)}  # fmt: skip

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Daemon:
        """A handle on a daemon another process started (for ``hack/cluster`` commands)."""
        return cls(record["name"], list(record.get("argv", [])), Path(record["log"]),
                   int(record["pid"]), record.get("start_time"))  # fmt: skip


def stop_recorded(record: dict[str, Any], timeout: float = 5.0) -> None:
    stop_pid(int(record["pid"]), record.get("start_time"), timeout)


def stop_leftover_daemons(
    select: Callable[[dict[str, Any]], bool] = lambda rec: True,
) -> list[str]:
    """Stop every recorded daemon (``select``-ed) that still runs (same PID and start time) and
    forget it.  Without ``select`` that includes daemons of other live test runs."""
    report = []
    for p in sorted(leftovers_dir().glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except (ValueError, OSError):
            continue
        if not select(rec):
            continue
        if is_alive(int(rec["pid"]), rec.get("start_time")):
            stop_recorded(rec)
            report.append(f"stopped leftover {rec['name']} (pid {rec['pid']})")
        p.unlink(missing_ok=True)
    return report
