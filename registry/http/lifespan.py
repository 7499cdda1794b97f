"""The ASGI `lifespan` protocol, run by the server around the time it serves requests.

Invariants: the application's lifespan call runs in a task of its own for the whole time the
server serves (an application may keep a nursery open in it for its background tasks);
`startup` returns once the application reported `lifespan.startup.complete` and raises
`LifespanFailed` on `lifespan.startup.failed`; an application that raises (or returns) before
completing startup does not support lifespan, and the server serves without it, as the ASGI
spec asks.  `shutdown` asks once and waits at most `timeout` for the answer.  The `state` dict
is the one every request scope gets a shallow copy of.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from registry.http.asgi import AsgiApp, Message

__all__ = ["DEFAULT_LIFESPAN_TIMEOUT", "Lifespan", "LifespanFailed"]

DEFAULT_LIFESPAN_TIMEOUT = 60.0  # as Hypercorn's startup and shutdown timeouts

logger = logging.getLogger(__name__)


class LifespanFailed(Exception):
    """The application reported that its startup failed."""


class Lifespan:
    """One application's lifespan: `run` in a nursery, then `startup`, later `shutdown`."""

    def __init__(
        self, app: AsgiApp, state: dict[str, Any], *, timeout: float = DEFAULT_LIFESPAN_TIMEOUT
    ) -> None:
        self.app = app
        self.state = state
        self.timeout = timeout
        self.supported = True
        self._startup_asked = False
        self._started = trio.Event()  # startup complete or failed, or no lifespan support
        self._failure: str | None = None
        self._shutdown_asked = trio.Event()
        self._shut_down = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The application's lifespan call; returns when the application does."""
        scope = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "state": self.state,
        }
        task_status.started()
        try:
            await self.app(scope, self._receive, self._send)
        except Exception as exc:
            if self._started.is_set():
                logger.error("ASGI lifespan failed", extra={"error": repr(exc)}, exc_info=exc)
            else:
                self.supported = False
                logger.info("ASGI application without lifespan", extra={"error": repr(exc)})
        finally:
            if not self._started.is_set():
                self.supported = False
            self._started.set()
            self._shut_down.set()

    async def _receive(self) -> Message:
        if not self._startup_asked:
            self._startup_asked = True
            return {"type": "lifespan.startup"}
        await self._shutdown_asked.wait()
        return {"type": "lifespan.shutdown"}

    async def _send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "lifespan.startup.complete":
            self._started.set()
        elif kind == "lifespan.startup.failed":
            self._failure = str(message.get("message", ""))
            self._started.set()
        elif kind == "lifespan.shutdown.complete":
            self._shut_down.set()
        elif kind == "lifespan.shutdown.failed":
            logger.error("ASGI lifespan shutdown failed", extra={"error": message.get("message")})
            self._shut_down.set()
        else:
            raise RuntimeError(f"ASGI lifespan: unknown message {kind!r}")

    async def startup(self) -> None:
        """Wait for the application's startup (at most `timeout`: then trio.TooSlowError)."""
        with trio.fail_after(self.timeout):
            await self._started.wait()
        if self._failure is not None:
            raise LifespanFailed(self._failure)

    async def shutdown(self) -> None:
        """Ask the application to shut down and wait for it, at most `timeout`."""
        self._shutdown_asked.set()
        with trio.move_on_after(self.timeout) as scope:
            await self._shut_down.wait()
        if scope.cancelled_caught:
            logger.warning("ASGI lifespan shutdown timed out", extra={"timeout": self.timeout})
