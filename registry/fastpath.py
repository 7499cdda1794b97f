"""Zero-copy front door: local blob GET/HEADs go out by `os.sendfile`, all else to Hypercorn.

Why: Hypercorn implements no zero-copy ASGI extension, so a Quart body tops out near 2 GB/s at
~0.45 CPU-s/GiB, while `sendfile` from Trio reaches ~5 GB/s at ~0.2 CPU-s/GiB (stack notes §2.2),
beating docker-registry.  Local blob reads are what a node serves most, so they get this path.

Design (small on purpose):
- One listener; each connection is read by `_FrontDoor.connection`, one request head at a time.
  For a bodiless HTTP/1.1 GET/HEAD it asks `plan_local_blob` (in `registry.app`, the same code
  the Quart route uses) whether this is a satisfiable request for a local blob backed by a
  readable file.  If so it writes the head the app would have written and `sendfile`s the bytes.
- A GET of a blob the app would mirror from peers is answered here too (`registry.mirror_door`):
  the forwarder's pooled chunks go to the socket without the copies the ASGI path makes.
- Any other simple request (manifests, HEADs, errors, /readyz) is passed to
  Hypercorn's own `TCPServer` for exactly one request: it reads the request bytes, the Quart app
  answers, and `_ResponseWatch` follows the response bytes going out (status line, Content-Length,
  HEAD) to see when it is complete; Hypercorn then reads end-of-stream, its close is ignored and
  the connection comes back to the front door.  So keep-alive clients that mix manifests and blobs
  (containerd, peers) still get sendfile for every local blob.
- Anything the front door does not understand (HTTP/1.0, request bodies, odd heads, responses
  whose length cannot be followed) hands the connection to Hypercorn for good, replaying the bytes
  already read.  The Quart app stays the registry's face: this path only ever serves responses the
  app would have served, with headers built by the same function.
- Hypercorn's lifespan, worker context and graceful shutdown are driven as `hypercorn.trio.serve`
  does; idle front-door connections are closed as soon as shutdown starts.
"""

from __future__ import annotations

import email.utils
import logging
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from functools import partial
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import trio
from hypercorn.config import Config
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app
from quart_trio import QuartTrio

from registry.access_log import access_logger, client_ip, log_access, record_request
from registry.app import LocalBlob, MirrorPlan, plan_local_blob, plan_mirror_blob
from registry.interfaces import ContentNotFound
from registry.metrics import HTTP_INFLIGHT
from registry.mirror_door import serve_mirror_blob

__all__ = ["FastPathStats", "serve_front_door"]

logger = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024
READ_SIZE = 64 * 1024
SENDFILE_CHUNK = 8 * 1024 * 1024


class FastPathStats:
    """Requests served here (`served`; `mirrored` of them from peers), passed to the app one at
    a time (`passed_on`), and connections handed to Hypercorn for good (`handed_off`)."""

    def __init__(self) -> None:
        self.served = 0
        self.mirrored = 0
        self.passed_on = 0
        self.handed_off = 0


class _ResponseWatch:
    """Follows the bytes of one response going out, to tell when it is complete.

    `settled` is set when the response is complete (`done`), or when it cannot be followed
    (no Content-Length, chunked, 1xx): then the connection stays with Hypercorn for good.
    """

    def __init__(self, method: str) -> None:
        self._method = method
        self._head = bytearray()
        self._remaining: int | None = None
        self.settled = trio.Event()
        self.done = False
        self.close = False

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self.settled.is_set():
            if self.done and len(data):
                self.close = True  # more than announced: do not trust this connection
            return
        if self._remaining is None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            body_bytes = len(self._head) - end - 4
            length = self._body_length(bytes(self._head[:end]))
            if length is None:
                self.settled.set()
                return
            self._remaining = length - body_bytes
        else:
            self._remaining -= len(data)
        if self._remaining <= 0:
            self.close = self.close or self._remaining < 0
            self.done = True
            self.settled.set()

    def _body_length(self, head: bytes) -> int | None:
        lines = head.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split(" ")[1])
        except (IndexError, ValueError):
            return None
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "close" in headers.get("connection", "").lower():
            self.close = True
        if status < 200 or "transfer-encoding" in headers:
            return None
        if self._method == "HEAD" or status in (204, 304):
            return 0
        length = headers.get("content-length", "")
        return int(length) if length.isdigit() else None


class _HandoffStream:
    """The client connection as Hypercorn sees it while it serves requests the front door passed on.

    Per request (`watch` given): Hypercorn reads the request head, then end-of-stream once its
    response has gone out completely; its close is then ignored and the front door carries on with
    the connection.  For good (`watch` None, or a response that cannot be followed): a plain
    pass-through, replaying `replay` first.
    """

    def __init__(
        self,
        stream: trio.SocketStream,
        replay: bytes,
        watch: _ResponseWatch | None,
        pipelined: bytes = b"",
    ) -> None:
        self._stream = stream
        self._replay = replay
        self._watch = watch
        self._pipelined = pipelined  # read after `replay` only if the connection stays here
        self.socket = stream.socket

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._replay:
            data, self._replay = self._replay, b""
            return data
        if self._watch is not None:
            await self._watch.settled.wait()
            if self._watch.done:
                return b""
        if self._pipelined:
            data, self._pipelined = self._pipelined, b""
            return data
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._watch is not None:
            self._watch.feed(data)
        await self._stream.send_all(data)

    async def send_eof(self) -> None:
        if not self._finished_cleanly():
            await self._stream.send_eof()

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        if not self._finished_cleanly():
            await self._stream.aclose()

    def _finished_cleanly(self) -> bool:
        return self._watch is not None and self._watch.done and not self._watch.close

    @property
    def reusable(self) -> bool:
        """After Hypercorn returned: may the front door read the next request?"""
        return self._finished_cleanly() and not self._replay


class _Head:
    """The parts of a request head the fast path looks at."""

    def __init__(self, method: str, target: str, version: str, headers: dict[str, str]) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers


def _parse_head(raw: bytes) -> _Head | None:
    """A minimal HTTP/1.1 request head parser; None means "let Hypercorn deal with it"."""
    try:
        text = raw.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes everything
        return None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        return None
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or name.lower() in headers:
            return None
        headers[name.lower()] = value.strip()
    return _Head(method, target, version, headers)


def _simple(head: _Head) -> bool:
    """A bodiless HTTP/1.1 GET/HEAD: served here or passed to the app one request at a time."""
    if head.method not in ("GET", "HEAD") or head.version != "HTTP/1.1":
        return False
    if "host" not in head.headers or "transfer-encoding" in head.headers:
        return False
    if head.headers.get("content-length", "0") != "0" or "expect" in head.headers:
        return False
    return "upgrade" not in head.headers


class _FrontDoor:
    def __init__(
        self,
        app: QuartTrio,
        hypercorn_app: Any,
        config: Config,
        context: WorkerContext,
        state: dict[str, Any],
        stats: FastPathStats,
        head_timeout: float,
    ) -> None:
        self.head_timeout = head_timeout
        self.app = app
        self.hypercorn_app = hypercorn_app
        self.config = config
        self.context = context
        self.state = state
        self.stats = stats
        self.idle: set[trio.CancelScope] = set()
        self.closing = False

    def close_idle(self) -> None:
        self.closing = True
        for scope in self.idle:
            scope.cancel()

    async def connection(self, stream: trio.SocketStream) -> None:
        """Serve one client connection; whatever happens, only this connection is affected."""
        try:
            await self._connection(stream)
        except Exception:
            logger.exception("registry connection failed")
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _connection(self, stream: trio.SocketStream) -> None:
        buffer = b""
        try:
            while True:
                head_end = buffer.find(b"\r\n\r\n")
                if head_end < 0:
                    if len(buffer) > MAX_HEAD:
                        break
                    data = await self._receive(stream, idle=not buffer)
                    if not data:
                        await stream.aclose()
                        return
                    buffer += data
                    continue
                head = _parse_head(buffer[:head_end])
                if head is None or not _simple(head):
                    break
                request, buffer = buffer[: head_end + 4], buffer[head_end + 4 :]
                keep_alive = head.headers.get("connection", "").lower() != "close"
                plan = await self._plan(head) if "/blobs/" in head.target else None
                served = plan is not None and await self._serve(stream, head, plan, keep_alive)
                if not served and head.method == "GET" and "/blobs/" in head.target:
                    mirror = await self._plan_mirror(head)
                    if mirror is not None:
                        # a blob from peers: written here from pooled buffers (mirror_door)
                        self.stats.mirrored += 1
                        path = unquote(urlsplit(head.target).path)
                        ip = client_ip(head.headers.get("x-forwarded-for"), _peer_ip(stream))
                        if not await serve_mirror_blob(stream, mirror, keep_alive, ip, path):
                            await stream.aclose()
                            return
                        served = True
                if not served:
                    # the app answers this one request; then the connection comes back here
                    self.stats.passed_on += 1
                    watch = _ResponseWatch(head.method)
                    handoff = _HandoffStream(stream, request, watch, buffer)
                    await self._run_hypercorn(handoff)
                    if not handoff.reusable:
                        if watch.settled.is_set() and not watch.done:
                            return  # Hypercorn kept the connection and has closed it
                        await stream.aclose()
                        return
                if not keep_alive or self.closing:
                    await stream.aclose()
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await stream.aclose()
            return
        self.stats.handed_off += 1
        await self._run_hypercorn(_HandoffStream(stream, buffer, None))

    async def _run_hypercorn(self, stream: _HandoffStream) -> None:
        state = ConnectionState(self.state.copy())
        duck: Any = stream  # duck-types the trio SocketStream Hypercorn's TCPServer uses
        await TCPServer(self.hypercorn_app, self.config, self.context, state, duck).run()

    async def _receive(self, stream: trio.SocketStream, *, idle: bool) -> bytes:
        """Read more of a request head; between requests, give up after the keep-alive timeout."""
        if not idle:
            with trio.move_on_after(self.head_timeout):
                return bytes(await stream.receive_some(READ_SIZE))
            return b""  # a head trickling in slower than head_timeout: hang up
        with trio.move_on_after(self.config.keep_alive_timeout) as scope:
            self.idle.add(scope)
            try:
                if self.closing:
                    scope.cancel()
                return bytes(await stream.receive_some(READ_SIZE))
            finally:
                self.idle.discard(scope)
        return b""

    async def _plan(self, head: _Head) -> LocalBlob | None:
        parts = urlsplit(head.target)
        query = parse_qs(parts.query)
        ns_values = query.get("ns")
        return await plan_local_blob(
            self.app,
            method=head.method,
            path=unquote(parts.path),
            ns=ns_values[0] if ns_values else None,
            range_header=head.headers.get("range"),
        )

    async def _plan_mirror(self, head: _Head) -> MirrorPlan | None:
        parts = urlsplit(head.target)
        ns_values = parse_qs(parts.query).get("ns")
        return await plan_mirror_blob(
            self.app,
            method=head.method,
            path=unquote(parts.path),
            ns=ns_values[0] if ns_values else None,
            headers=head.headers,
        )

    async def _serve(
        self, stream: trio.SocketStream, head: _Head, plan: LocalBlob, keep_alive: bool
    ) -> bool:
        """Send the planned response; False (nothing sent) if no readable file backs the content."""
        async with AsyncExitStack() as stack:
            fd = -1
            try:
                path = await stack.enter_async_context(plan.open())
                if head.method == "GET" and plan.length:
                    fd = os.open(path, os.O_RDONLY)
            except (ContentNotFound, OSError):
                return False
            if fd >= 0:
                stack.callback(os.close, fd)
            started = time.monotonic()
            self.stats.served += 1
            HTTP_INFLIGHT.labels("/v2/*").inc()
            reason = "OK" if plan.status == 200 else "Partial Content"
            lines = [f"HTTP/1.1 {plan.status} {reason}"]
            lines += [f"{name}: {value}" for name, value in plan.headers.items()]
            lines.append(f"date: {email.utils.formatdate(usegmt=True)}")
            if not keep_alive:
                lines.append("connection: close")
            sent = 0
            try:
                await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
                if fd >= 0:
                    sent = await _sendfile(stream, fd, plan.offset, plan.length)
            finally:
                record_request("/v2/*", head.method, str(plan.status), sent, started)
                if access_logger.isEnabledFor(logging.DEBUG):
                    _log_served(stream, head, plan, sent, started)
        return True


def _log_served(
    stream: trio.SocketStream, head: _Head, plan: LocalBlob, sent: int, started: float
) -> None:
    """The DEBUG access line of a request served here (as the app writes for its own)."""
    peer = _peer_ip(stream)
    log_access(
        handler="blob",
        method=head.method,
        path=unquote(urlsplit(head.target).path),
        status=plan.status,
        started=started,
        ip=client_ip(head.headers.get("x-forwarded-for"), peer),
        registry=plan.headers.get("oci-namespace", ""),
        size=sent,
    )


def _peer_ip(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return ""


async def _sendfile(stream: trio.SocketStream, fd: int, offset: int, length: int) -> int:
    """Send `length` bytes of the open file `fd` from `offset`; the count sent."""
    sent = 0
    sock = stream.socket
    while sent < length:
        try:
            n = os.sendfile(sock.fileno(), fd, offset + sent, min(SENDFILE_CHUNK, length - sent))
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        if n == 0:
            raise OSError(f"content ended {length - sent} bytes early")
        sent += n
        await trio.lowlevel.checkpoint()
    return sent


async def serve_front_door(
    app: QuartTrio,
    config: Config,
    sock: trio.socket.SocketType,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None,
    stats: FastPathStats,
    head_timeout: float = 10.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve on the listening `sock` until `shutdown_trigger` returns, then drain gracefully.

    A request head must arrive within `head_timeout` seconds once it has started.
    """
    hypercorn_app = wrap_app(app, config.wsgi_max_body_size, None)
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(hypercorn_app, config, lifespan_state)
    context = WorkerContext(None)
    door = _FrontDoor(app, hypercorn_app, config, context, lifespan_state, stats, head_timeout)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as server_nursery:
            listener = trio.SocketListener(sock)
            async with trio.open_nursery() as accept_nursery:
                accept_nursery.start_soon(
                    partial(
                        trio.serve_listeners,
                        door.connection,
                        [listener],
                        handler_nursery=server_nursery,
                    )
                )
                task_status.started()
                if shutdown_trigger is not None:
                    await shutdown_trigger()
                else:
                    await trio.sleep_forever()
                accept_nursery.cancel_scope.cancel()
            await listener.aclose()
            await context.terminated.set()
            door.close_idle()
            server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
