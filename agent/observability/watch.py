"""`spegla watch [ADDR]`: a live terminal view of one agent, fed by its debug websocket.

Why this shape: a trio-websocket client reads `ws://ADDR/debug/web/ws` (the feed the debug page
uses) into a `WatchView`; on a terminal the screen is redrawn in place on the alternate screen at
most `FPS` times a second, elsewhere (a pipe, a log file, `kubectl exec` without -t) plain lines are
printed. A dropped connection (agent restarting, port closed) is retried with backoff, the view
saying so; SIGINT/SIGTERM end the run with exit code 0 and the terminal restored.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
from typing import Any, TextIO

import trio
from trio_websocket import open_websocket_url

from agent.observability.watch_view import WatchView

FPS = 4
CONNECT_TIMEOUT = 3.0
MAX_BACKOFF = 5.0
MAX_MESSAGE = 8 << 20

ENTER_SCREEN = "\x1b[?1049h\x1b[?25l"
LEAVE_SCREEN = "\x1b[?25h\x1b[?1049l"


def ws_url(address: str) -> str:
    """`host:port`, `http://host:port[/...]` or `ws://...` -> the debug feed's websocket URL."""
    address = address.strip().rstrip("/")
    for scheme, ws in (("http://", "ws://"), ("https://", "wss://")):
        if address.startswith(scheme):
            address = ws + address[len(scheme) :]
    if not address.startswith(("ws://", "wss://")):
        address = "ws://" + address
    if address.endswith("/debug/web/ws"):
        return address
    for suffix in ("/debug/web", "/metrics"):
        if address.endswith(suffix):
            address = address[: -len(suffix)]
    return address + "/debug/web/ws"


def _why(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, OSError) and exc.strerror is None and exc.__cause__ is not None:
        return _why(exc.__cause__)
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


class Watcher:
    def __init__(self, address: str, out: TextIO, *, plain: bool) -> None:
        self.url = ws_url(address)
        self.out = out
        self.plain = plain
        self.view = WatchView(address=address)
        self.dirty = trio.Event()

    def emit(self, lines: list[str]) -> None:
        if lines:
            self.out.write("\n".join(lines) + "\n")
            self.out.flush()

    def set_status(self, status: str, connected: bool) -> None:
        self.view.status, self.view.connected = status, connected
        if self.plain:
            self.emit([f"-- {status}"])
        self.dirty.set()

    async def feed(self) -> None:
        backoff = 0.5
        while True:
            try:
                async with open_websocket_url(
                    self.url, connect_timeout=CONNECT_TIMEOUT, max_message_size=MAX_MESSAGE
                ) as ws:
                    self.set_status(f"connected to {self.url}", True)
                    backoff = 0.5
                    while True:
                        self.receive(await ws.get_message())
            except Exception as exc:  # refused, reset, closed by a restarting agent, handshake
                reason = _why(exc)
            self.set_status(f"disconnected: {reason}; retrying in {backoff:g} s", False)
            await trio.sleep(backoff)
            backoff = min(MAX_BACKOFF, backoff * 2)

    def receive(self, raw: str | bytes) -> None:
        try:
            message: Any = json.loads(raw)
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        if self.plain:
            self.emit(self.view.lines_for(message, trio_time()))
        else:
            self.view.apply(message)
            self.dirty.set()

    async def redraw(self) -> None:
        while True:
            await self.dirty.wait()
            self.dirty = trio.Event()
            size = shutil.get_terminal_size((100, 30))
            lines = self.view.screen(size.columns, size.lines)
            self.out.write("\x1b[H" + "\x1b[K\n".join(lines) + "\x1b[K\x1b[J")
            self.out.flush()
            await trio.sleep(1 / FPS)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(stop_on_signal)
            nursery.start_soon(self.feed)
            if not self.plain:
                nursery.start_soon(self.redraw)
                nursery.start_soon(self._tick)

    async def _tick(self) -> None:
        """Redraw once a second even without news (clock, rates)."""
        while True:
            await trio.sleep(1.0)
            self.dirty.set()


def trio_time() -> float:
    import time

    return time.time()


def watch_main(address: str, *, plain: bool | None = None, out: TextIO | None = None) -> int:
    stream = out or sys.stdout
    if plain is None:
        plain = not (stream.isatty() and (sys.platform != "win32"))
    watcher = Watcher(address, stream, plain=plain)
    if not plain:
        stream.write(ENTER_SCREEN)
        stream.flush()
    try:
        trio.run(watcher.run)
    finally:
        if not plain:
            stream.write(LEAVE_SCREEN)
            stream.flush()
    return 0
