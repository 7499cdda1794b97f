"""Supervision of the agent's long-running services: restart a crashed one with backoff, give up
(and take the agent down) when one keeps crashing.

Why: a node agent must survive a transient failure (containerd restarting, a socket error) without
the kubelet restarting the whole pod, but must not hide a persistent fault behind an endless
restart loop. The restart decision is a pure object (`CrashBudget`); `Supervisor.run` is the thin
Trio driver, used with `nursery.start` so a service's readiness (`task_status.started(value)`)
reaches the caller once.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

logger = logging.getLogger(__name__)


class Service(Protocol):
    """`async def service(*, task_status=trio.TASK_STATUS_IGNORED)`: calls
    `task_status.started(value)` once ready and runs until cancelled."""

    def __call__(self, *, task_status: trio.TaskStatus[Any] = ...) -> Awaitable[None]: ...


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """Exponential backoff between restarts; > `max_restarts` crashes within `window` is fatal."""

    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    max_restarts: int = 5
    window: float = 300.0


class ServiceFailed(Exception):
    """A service crashed more often than its policy allows; the agent should exit non-zero."""

    def __init__(self, name: str, crashes: int) -> None:
        super().__init__(f"service {name!r} crashed {crashes} times; giving up")
        self.name = name
        self.crashes = crashes


@dataclass(slots=True)
class CrashBudget:
    """Sans-IO restart decisions: feed crash times, get the delay before the next start."""

    policy: RestartPolicy = RestartPolicy()
    crashes: deque[float] = field(default_factory=deque)

    def record_crash(self, now: float) -> float | None:
        """Register a crash at `now`; return the backoff before restarting, or None to give up."""
        self.crashes.append(now)
        while self.crashes and now - self.crashes[0] > self.policy.window:
            self.crashes.popleft()
        count = len(self.crashes)
        if count > self.policy.max_restarts:
            return None
        delay: float = self.policy.initial_backoff * 2.0 ** (count - 1)
        return min(self.policy.max_backoff, delay)


@dataclass(slots=True)
class Supervisor:
    """Runs named services under one policy and keeps their current state for the debug views."""

    policy: RestartPolicy = RestartPolicy()
    states: dict[str, str] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)

    async def start(self, nursery: trio.Nursery, name: str, service: Service) -> Any:
        """Supervise `service` in `nursery` as a task called `name` (so the task tree shows the
        service by name); return its first readiness value."""
        return await nursery.start(self.run, name, service, name=name)

    def start_soon(self, nursery: trio.Nursery, name: str, service: Service) -> None:
        """`start` without waiting for the service to be ready."""
        nursery.start_soon(self.run, name, service, name=name)

    async def run(
        self,
        name: str,
        service: Service,
        *,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Start `service`, report its first readiness, restart on crash, or raise ServiceFailed."""
        budget = CrashBudget(self.policy)
        reported = False
        self.restarts.setdefault(name, 0)
        while True:
            self.states[name] = "starting"
            try:
                async with trio.open_nursery() as nursery:
                    value = await nursery.start(service)
                    self.states[name] = "running"
                    if not reported:
                        reported = True
                        task_status.started(value)
                    else:
                        logger.info("service restarted", extra={"service": name})
                self.states[name] = "stopped"
                logger.info("service finished", extra={"service": name})
                if not reported:
                    task_status.started(None)
                return
            except Exception as exc:
                delay = budget.record_crash(trio.current_time())
                if delay is None:
                    self.states[name] = "failed"
                    logger.error(
                        "service keeps crashing, giving up",
                        extra={"service": name, "crashes": len(budget.crashes)},
                        exc_info=exc,
                    )
                    raise ServiceFailed(name, len(budget.crashes)) from exc
                self.states[name] = "restarting"
                self.restarts[name] += 1
                logger.warning(
                    "service crashed, restarting",
                    extra={"service": name, "restart_in_s": delay, "crashes": len(budget.crashes)},
                    exc_info=exc,
                )
                await trio.sleep(delay)
