"""One ASGI 3 `http` request answered on a `ServerConnection`: the scope, `receive` and `send`.

Why: the server hands each request h11 has read to any ASGI application and frames its
`http.response.*` messages with the same h11 connection, so keep-alive, pipelining and framing
stay h11's business and the application needs to know nothing of the transport.  Besides the
core messages it implements two ASGI extensions, announced in `scope["extensions"]`:
`http.response.zerocopysend` (a range of an open file, by `os.sendfile`) and
`http.response.pathsend` (a whole file by path, by `os.sendfile`).

Invariants:
- `send` returns only once the message's bytes have been handed to the kernel; a body
  (bytes, bytearray or memoryview) is written from the application's own buffer, never queued,
  so the application may reuse or release the buffer as soon as `send` returns.  Body pieces
  from `DIRECT_SEND_MIN` bytes are written without any copy; smaller ones are framed together
  with the response head (one write).
- `zerocopysend` may be sent many times (a file that is still growing goes out as ranges as its
  bytes land); h11's data pass-through keeps Content-Length exact, and a file shorter than the
  range announced ends the response early (the connection is closed).
- `receive` gives the request body once, then waits until the client has gone (it closed or
  reset its connection: a client's end of stream counts as leaving, as in nginx) or until the
  response is complete, and then returns `http.disconnect`.  The client's socket is watched
  (a one-byte MSG_PEEK receive, in the task that called `receive`, cancelled when the
  exchange ends) only while the application waits in `receive`; bytes of a
  pipelined next request mean the client is still there.  After an end of stream sends still
  go out (a client that half-closed reads its answer; one that closed makes a later write fail
  with `ClientGone`); after a reset every `send` raises `ClientGone`.  An application that must
  answer half-closed clients does not wait in `receive` while it answers (the registry app
  watches for `http.disconnect` only while it fetches a blob from peers:
  `registry.serve.connection.ClientWatch`).
- The application failing before any response byte went out gets the client a 500; failing
  midway leaves the response incomplete, and the server closes the connection.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import h11
import trio

from registry.http.connection import (
    DIRECT_SEND_MIN,
    FileRange,
    HttpRequest,
    ServerConnection,
    is_client_gone,
)

__all__ = [
    "EXTENSIONS",
    "Address",
    "AsgiApp",
    "Message",
    "Scope",
    "http_scope",
    "run_http",
    "socket_addresses",
    "split_target",
]

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
AsgiApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]
Address = tuple[str, int] | None

# the extensions this server implements (a fresh copy goes into every scope)
EXTENSIONS: Mapping[str, Mapping[str, object]] = {
    "http.response.pathsend": {},
    "http.response.zerocopysend": {},
}


def split_target(target: bytes) -> tuple[str, bytes, bytes]:
    """(decoded path, raw path, query string) of a request target, origin- or absolute-form.
    Percent-escapes decode as UTF-8 (as the ASGI spec and Hypercorn have it)."""
    text = target.decode("latin-1")
    if not text.startswith("/") and "://" in text:  # absolute-form: http://host/path?query
        parts = urlsplit(text)
        raw_path = (parts.path or "/").encode("latin-1")
        query = parts.query.encode("latin-1")
    else:
        raw_path, _, query = target.partition(b"?")
    return unquote(raw_path.decode("latin-1")), raw_path, query


def socket_addresses(stream: trio.SocketStream) -> tuple[Address, Address]:
    """(client, server) addresses of a connection, as ASGI scopes carry them (None off TCP)."""

    def address(get: Callable[[], Any]) -> Address:
        try:
            value = get()
        except OSError:
            return None
        if isinstance(value, tuple) and len(value) >= 2:
            return str(value[0]), int(value[1])
        return None

    sock = stream.socket
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None, None
    return address(sock.getpeername), address(sock.getsockname)


def http_scope(
    request: HttpRequest, *, client: Address, server: Address, state: Mapping[str, Any]
) -> Scope:
    """The ASGI `http` scope of `request`, with the keys Hypercorn gives (and our extensions)."""
    path, raw_path, query = split_target(request.target)
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": request.http_version,
        "method": request.method,
        "scheme": "http",
        "path": path,
        "raw_path": raw_path,
        "query_string": query,
        "root_path": "",
        "headers": request.headers,
        "client": client,
        "server": server,
        "extensions": {name: dict(value) for name, value in EXTENSIONS.items()},
        "state": dict(state),
    }


class _Exchange:
    """The `receive` and `send` of one request; `over` is set (by `end`) once the response is
    complete, the client left, or the application returned."""

    def __init__(self, conn: ServerConnection, request: HttpRequest):
        self.conn = conn
        self.request = request
        self.head_only = request.method == "HEAD"
        self.over = trio.Event()
        self.left = False  # the client closed or reset its connection
        self.reset = False  # ... reset it (or the socket failed): nothing can reach it now
        self.watch: trio.CancelScope | None = None  # a `receive` watching the client's socket
        self.body_given = False
        self.start: tuple[int, list[tuple[bytes, bytes]]] | None = None  # status, headers
        self.head_out = False  # h11 has framed the head (bytes may be on the wire)
        self.complete = False

    def end(self) -> None:
        """The exchange is over: every `receive` returns `http.disconnect` now."""
        self.over.set()
        if self.watch is not None:
            self.watch.cancel()

    # -- receive ---------------------------------------------------------------------------

    async def receive(self) -> Message:
        if not self.body_given:
            self.body_given = True
            return {"type": "http.request", "body": self.request.body, "more_body": False}
        if self.watch is None and not self.over.is_set():
            with trio.CancelScope() as self.watch:  # cancelled by `end`
                await self._watch_client()
            self.watch = None
        await self.over.wait()
        return {"type": "http.disconnect"}

    async def _watch_client(self) -> None:
        """Return once the client closed or reset its connection (then `end`); if it sends
        more (a pipelined request, which h11 reads after this answer), wait for `end`."""
        try:
            data = await self.conn.stream.socket.recv(1, socket.MSG_PEEK)
        except OSError:
            self.reset = True
            data = b""
        if data:
            await self.over.wait()
            return
        self.left = True
        self.end()

    # -- send ------------------------------------------------------------------------------

    async def send(self, message: Message) -> None:
        if self.reset:
            raise self.conn.gone("client reset the connection")
        kind = message["type"]
        if kind == "http.response.start":
            if self.start is not None:
                raise RuntimeError("ASGI: http.response.start sent twice")
            headers = [(bytes(k).lower(), bytes(v)) for k, v in message.get("headers", ())]
            self.start = (int(message["status"]), headers)
            return
        if self.start is None or self.complete:
            raise RuntimeError(f"ASGI: {kind} outside a response")
        if kind == "http.response.body":
            await self._body(message.get("body", b""), bool(message.get("more_body", False)))
        elif kind == "http.response.zerocopysend":
            await self._zerocopy(message)
        elif kind == "http.response.pathsend":
            await self._pathsend(str(message["path"]))
        else:
            raise RuntimeError(f"ASGI: unknown message {kind!r}")

    def _head(self) -> bytes:
        """The response head's bytes the first time (h11 takes the response then), else b""."""
        if self.head_out or self.start is None:
            return b""
        self.head_out = True
        status, headers = self.start
        return self.conn.response_head(status, headers)

    def _end(self, more_body: bool) -> bytes:
        if more_body:
            return b""
        self.complete = True
        return self.conn.end_bytes()

    async def _finish(self, more_body: bool) -> None:
        """Send what is due after a body part: the end of the message if it was the last."""
        end = self._end(more_body)
        if end:
            await self.conn.send_bytes(end)
        if self.complete:
            self.end()

    async def _body(self, body: bytes | bytearray | memoryview, more_body: bool) -> None:
        head = self._head()
        if self.head_only or len(body) < DIRECT_SEND_MIN:
            framed = self.conn.body_bytes(body) if body and not self.head_only else b""
            await self.conn.send_bytes(head + framed + self._end(more_body))
        else:
            await self.conn.send_bytes(head)
            await self.conn.send_view(body)
            end = self._end(more_body)
            if end:
                await self.conn.send_bytes(end)
        if self.complete:
            self.end()

    async def _zerocopy(self, message: Message) -> None:
        more_body = bool(message.get("more_body", False))
        file = message["file"]  # an object with fileno(), as the spec has it, or a descriptor
        fd = file if isinstance(file, int) else int(file.fileno())
        offset = message.get("offset")
        from_position = offset is None  # the file's own position: it advances past the range
        start = os.lseek(fd, 0, os.SEEK_CUR) if offset is None else int(offset)
        count = message.get("count")
        length = max(0, os.fstat(fd).st_size - start) if count is None else int(count)
        if start < 0 or length < 0:
            raise ValueError("ASGI: zerocopysend offset and count must not be negative")
        await self.conn.send_bytes(self._head())
        if length and not self.head_only:
            await self.conn.send_file(FileRange(fd, start, length))
        if from_position:
            os.lseek(fd, start + length, os.SEEK_SET)
        await self._finish(more_body)

    async def _pathsend(self, path: str) -> None:
        if self.head_only:
            await self.conn.send_bytes(self._head() + self._end(False))
            self.end()
            return
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            length = os.fstat(fd).st_size
            await self.conn.send_bytes(self._head())
            if length:
                await self.conn.send_file(FileRange(fd, 0, length))
        finally:
            os.close(fd)
        await self._finish(False)


def _never(_exc: BaseException) -> bool:
    return False


async def run_http(
    app: AsgiApp,
    conn: ServerConnection,
    request: HttpRequest,
    *,
    client: Address,
    server: Address,
    state: Mapping[str, Any],
    is_expected: Callable[[BaseException], bool] = _never,
) -> None:
    """Let `app` answer `request` on `conn` (see the module's invariants).  Raises ClientGone
    when the client went away; an application error is logged (unless `is_expected` says it
    was meant, e.g. a body cut on purpose) and answered with a 500 if nothing went out yet."""
    scope = http_scope(request, client=client, server=server, state=state)
    gone: BaseException | None = None
    exchange = _Exchange(conn, request)
    try:
        await app(scope, exchange.receive, exchange.send)
    except Exception as exc:
        if exchange.left or is_client_gone(exc):
            gone = exc
        elif not _expected(exc, is_expected):
            logger.warning(
                "ASGI application failed",
                extra={"error": repr(exc), "path": scope["path"]},
                exc_info=exc,
            )
    finally:
        exchange.end()
    if gone is not None or (exchange.left and not exchange.complete):
        raise conn.gone("client closed the connection") from gone
    if not exchange.head_out:
        await _answer_500(conn)


def _expected(exc: BaseException, is_expected: Callable[[BaseException], bool]) -> bool:
    if is_expected(exc):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(_expected(inner, is_expected) for inner in exc.exceptions)
    return False


async def _answer_500(conn: ServerConnection) -> None:
    """The application gave no response (or failed before its first byte): a 500."""
    try:
        data = conn.response_head(500, [(b"content-length", b"0")]) + conn.end_bytes()
    except h11.LocalProtocolError:
        return
    await conn.send_bytes(data)
