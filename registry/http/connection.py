"""One HTTP/1.1 server connection, read and framed by h11: the server's only request parser.

Invariants: h11 reads every request head and body and frames every response, whether its body
is bytes from the application or a file range sent with `os.sendfile` (h11's data pass-through
keeps its Content-Length bookkeeping exact), so no second parser can disagree on where a request
ends.  Odd but legal forms (bare LF line ends, HTTP/1.0, a client that half-closes after its
request) are answered; malformed requests get a 400 (h11's 4xx hint where it has one) and a
closed connection: never silence, never a 5xx.

Timeouts are cancel scopes: a request head (and its small body) must arrive within `head_timeout`
of its first byte; between requests the connection may idle for `idle_timeout`, and `close_idle`
cuts idle waits short at shutdown.  Sending has a deadline too: every wait for the client to take
response bytes lasts at most `send_timeout` (a client that reads nothing for that long is gone:
ClientGone, so whoever holds an upload slot or a file for it lets go).  Every send returns once
its bytes are in the kernel: no body buffer is referenced after it.
"""

from __future__ import annotations

import email.utils
import errno
import os
import socket
import time
from dataclasses import dataclass
from http import HTTPStatus
from types import MappingProxyType
from typing import cast

import h11
import trio

__all__ = [
    "DEFAULT_SEND_TIMEOUT",
    "MAX_BODY",
    "MAX_HEAD",
    "ClientGone",
    "FileRange",
    "HttpDates",
    "HttpRequest",
    "ServerConnection",
    "http_date",
    "is_client_gone",
    "reason_phrase",
]

MAX_HEAD = 16 * 1024
MAX_BODY = 64 * 1024  # a pull-only registry reads no request bodies; a bigger one is a 413
READ_SIZE = 64 * 1024
SENDFILE_CHUNK = 8 * 1024 * 1024
DIRECT_SEND_MIN = 64 * 1024  # body pieces from this size are written by `_send_direct`
# Trio sets TCP_NOTSENT_LOWAT to 16 KiB on every socket stream (low latency for chatty protocols):
# the kernel then takes a small slice per write or sendfile call, and a non-blocking sender pays a
# system call and a scheduler pass per slice.  A mirrored body is bulk: its first big piece on a
# connection lifts the mark to this (the send buffer still bounds it; docs/decisions/bulk-sends.md).
BULK_NOTSENT_LOWAT = 4 * 1024 * 1024
LINGER = 1.0  # after answering and half-closing, read what the client still sends this long
DEFAULT_SEND_TIMEOUT = 30.0  # a client that takes no response bytes for this long is cut
SEND_SLICE = 64 * 1024  # `send_bytes` hands the socket this much per deadline


class ClientGone(Exception):
    """The client closed or reset the connection while it was being answered."""


def is_client_gone(exc: BaseException) -> bool:
    """ClientGone, alone or as every member of an exception group (raised through nurseries)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(is_client_gone(inner) for inner in exc.exceptions)
    return isinstance(exc, ClientGone)


@dataclass(frozen=True, slots=True)
class FileRange:
    """A body part sent from an open file with sendfile (an h11 pass-through `Data` payload)."""

    fd: int
    offset: int
    length: int

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """A request as h11 read it, body included (at most MAX_BODY bytes)."""

    method: str
    target: bytes
    http_version: str
    headers: list[tuple[bytes, bytes]]  # lower-case names, as h11 gives them
    body: bytes

    def header(self, name: bytes) -> str | None:
        """The first value of header `name` (lower case), or None."""
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None


_REASONS = MappingProxyType({status.value: status.phrase.encode() for status in HTTPStatus})


def reason_phrase(status: int) -> bytes:
    return _REASONS.get(status, b"")


def http_date(now: float) -> bytes:
    """The Date header value for the time `now` (seconds since the epoch)."""
    return email.utils.formatdate(int(now), usegmt=True).encode()


class HttpDates:
    """Date header values, formatted at most once per second.  One per server (its connections
    share it), so no module holds mutable state; the value is always that of the current
    second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._value = http_date(second)
            self._second = second
        return self._value


def _servable_target(target: bytes) -> bool:
    """Origin-form (/path), absolute-form (http://host/path) or OPTIONS' asterisk (RFC 9112 3.2);
    authority-form is for CONNECT, which a registry does not do."""
    return (
        target.startswith(b"/")
        or target == b"*"
        or target[:7].lower() == b"http://"
        or target[:8].lower() == b"https://"
    )


class _BodyTooLarge(Exception):
    pass


class ServerConnection:
    """The server side of one client connection: `next_request`, then send the answer, then
    `next_cycle` (False: close with `close`)."""

    def __init__(
        self,
        stream: trio.SocketStream,
        *,
        head_timeout: float,
        idle_timeout: float,
        send_timeout: float = DEFAULT_SEND_TIMEOUT,
        dates: HttpDates | None = None,
    ) -> None:
        self.stream = stream
        self.dates = dates or HttpDates()
        self.head_timeout = head_timeout
        self.idle_timeout = idle_timeout
        self.send_timeout = send_timeout
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._idle_scope: trio.CancelScope | None = None
        self._closing = False
        self._answered = False  # response bytes went out: close with a linger
        self._broken = False  # the client is gone: close at once
        self._head_request = False  # the request being answered is a HEAD (no body goes out)
        self._bulk = False  # TCP_NOTSENT_LOWAT lifted for bulk bodies (see BULK_NOTSENT_LOWAT)

    # -- reading ---------------------------------------------------------------------------

    async def next_request(self) -> HttpRequest | None:
        """The next request, body read; None when the connection is over (the client closed or
        went quiet, or sent something malformed: that was answered with a 4xx first)."""
        deadline: float | None = None
        try:
            while True:
                event = self._h11.next_event()
                if event is h11.NEED_DATA:
                    if deadline is None and self._h11.trailing_data[0]:
                        deadline = trio.current_time() + self.head_timeout  # a head has begun
                    data = await self._receive(deadline)
                    if data is None:
                        return None
                    if deadline is None:
                        deadline = trio.current_time() + self.head_timeout
                    self._h11.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    self._head_request = event.method == b"HEAD"
                    if not _servable_target(bytes(event.target)):
                        raise h11.RemoteProtocolError(
                            "request target must be a path (/...) or an absolute http URL"
                        )
                    start = deadline or trio.current_time() + self.head_timeout
                    body = await self._read_body(start)
                    return HttpRequest(
                        method=event.method.decode("ascii", "replace"),
                        target=bytes(event.target),
                        http_version=event.http_version.decode("ascii", "replace"),
                        headers=[(bytes(k), bytes(v)) for k, v in event.headers],
                        body=body,
                    )
                return None  # ConnectionClosed (or PAUSED after a close-delimited cycle)
        except h11.RemoteProtocolError as exc:
            hint = exc.error_status_hint
            await self._reject(hint if 400 <= hint < 500 else 400, str(exc))
        except _BodyTooLarge:
            await self._reject(413, f"request body larger than {MAX_BODY} bytes")
        except ClientGone:
            pass
        return None

    async def _receive(self, deadline: float | None) -> bytes | None:
        """Bytes from the client (b"" at end of stream); None on timeout or shutdown."""
        try:
            if deadline is not None:
                with trio.move_on_at(deadline):
                    return bytes(await self.stream.receive_some(READ_SIZE))
                return None
            if self._closing:
                return None
            with trio.move_on_after(self.idle_timeout) as scope:
                self._idle_scope = scope
                try:
                    return bytes(await self.stream.receive_some(READ_SIZE))
                finally:
                    self._idle_scope = None
            return None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._broken = True
            raise ClientGone(str(exc)) from exc

    async def _read_body(self, deadline: float) -> bytes:
        body = bytearray()
        while True:
            if self._h11.they_are_waiting_for_100_continue:
                await self.send(h11.InformationalResponse(status_code=100, headers=[]))
            event = self._h11.next_event()
            if event is h11.NEED_DATA:
                data = await self._receive(deadline)
                if data is None:
                    raise h11.RemoteProtocolError("request body timed out", error_status_hint=408)
                self._h11.receive_data(data)
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise _BodyTooLarge()
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:  # pragma: no cover - h11 raises for anything else mid-body
                raise h11.RemoteProtocolError("unexpected event in request body")

    def close_idle(self) -> None:
        """Shutdown: an idle wait for the next request ends now; no further requests are read."""
        self._closing = True
        if self._idle_scope is not None:
            self._idle_scope.cancel()

    # -- writing ---------------------------------------------------------------------------

    def response_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
        """The bytes of a response head (a Date header is added)."""
        headers = [*headers, (b"date", self.dates.now())]
        if self._closing:
            headers.append((b"connection", b"close"))
        event = h11.Response(status_code=status, headers=headers, reason=reason_phrase(status))
        return self._h11.send(event) or b""

    def body_bytes(self, data: bytes | bytearray | memoryview) -> bytes:
        return self._h11.send(h11.Data(data=cast(bytes, data))) or b""

    def end_bytes(self) -> bytes:
        return self._h11.send(h11.EndOfMessage()) or b""

    async def send(self, event: h11.Event) -> None:
        await self.send_bytes(self._h11.send(event) or b"")

    async def send_bytes(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        self._answered = True
        with memoryview(data) as view:
            # each slice must be taken within the deadline: a client that reads at all (more
            # than SEND_SLICE per send_timeout) is never cut, one that stops reading is
            for start in range(0, len(view), SEND_SLICE):
                try:
                    with trio.move_on_after(self.send_timeout) as scope:
                        await self.stream.send_all(view[start : start + SEND_SLICE])
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self._broken = True
                    raise ClientGone(str(exc)) from exc
                if scope.cancelled_caught:
                    self._stalled()

    def gone(self, reason: str) -> ClientGone:
        """The client left (seen by someone else than this connection's reads and writes): the
        exception to raise; the connection is closed without a linger."""
        self._broken = True
        return ClientGone(reason)

    def _stalled(self) -> None:
        self._broken = True  # part of a response is out: the connection cannot be reused
        raise ClientGone(f"client read nothing for {self.send_timeout:g} s")

    async def _wait_writable(self) -> None:
        """Wait until the socket takes bytes again, at most `send_timeout`."""
        with trio.move_on_after(self.send_timeout) as scope:
            await trio.lowlevel.wait_writable(self.stream.socket)
        if scope.cancelled_caught:
            self._stalled()

    async def send_view(self, data: bytes | bytearray | memoryview) -> None:
        """Send `data` as (the next piece of) the response body without copying it."""
        for piece in self._h11.send_with_data_passthrough(h11.Data(data=cast(bytes, data))) or []:
            if piece is data and len(data) >= DIRECT_SEND_MIN:
                await self._send_direct(data)
            else:
                await self.send_bytes(piece)

    def _allow_bulk(self) -> None:
        """Let the kernel queue a whole body piece per call (see BULK_NOTSENT_LOWAT)."""
        if self._bulk:
            return
        self._bulk = True
        option = getattr(socket, "TCP_NOTSENT_LOWAT", None)
        if option is not None:
            try:
                self.stream.socket.setsockopt(socket.IPPROTO_TCP, option, BULK_NOTSENT_LOWAT)
            except OSError:
                pass  # not a TCP socket (tests use socketpairs): nothing to lift

    async def _send_direct(self, data: bytes | bytearray | memoryview) -> None:
        """`send_bytes` for a big body piece: write to the socket's descriptor until the kernel
        stops taking bytes, wait only then.  Trio's `send_all` passes through the scheduler at
        each `send` call; with the not-sent mark lifted (`_allow_bulk`) the kernel takes a
        piece in one call unless the client lags."""
        self._answered = True
        self._allow_bulk()
        sock = self.stream.socket
        fd = sock.fileno()
        waited = False
        with memoryview(data) as view:
            sent, total = 0, len(view)
            while sent < total:
                try:
                    sent += os.write(fd, view[sent:])
                except BlockingIOError:
                    await self._wait_writable()
                    waited = True
                except OSError as exc:
                    self._broken = True
                    raise ClientGone(str(exc)) from exc
        if not waited:
            await trio.lowlevel.checkpoint()

    async def send_file(self, part: FileRange) -> int:
        """Send `part` as (the next piece of) the response body; the count of file bytes sent."""
        # h11 hands the very object back where the body bytes go (chunk framing around it)
        pieces = self._h11.send_with_data_passthrough(h11.Data(data=cast(bytes, part))) or []
        for piece in pieces:
            if piece is cast(bytes, part):
                await self._sendfile(part)
            else:
                await self.send_bytes(piece)
        return part.length

    async def _sendfile(self, part: FileRange) -> None:
        # sendfile keeps Trio's not-sent mark (docs/decisions/bulk-sends.md); only
        # `_send_direct` lifts it
        sock = self.stream.socket
        sent = 0
        while sent < part.length:
            try:
                n = os.sendfile(
                    sock.fileno(),
                    part.fd,
                    part.offset + sent,
                    min(SENDFILE_CHUNK, part.length - sent),
                )
            except BlockingIOError:
                await self._wait_writable()
                continue
            except OSError as exc:
                if exc.errno in _CLIENT_GONE_ERRNOS:
                    self._broken = True
                    raise ClientGone(str(exc)) from exc
                raise
            if n == 0:
                raise OSError(f"content ended {part.length - sent} bytes early")
            sent += n
            await trio.lowlevel.checkpoint()

    async def _reject(self, status: int, reason: str) -> None:
        """Answer a request that cannot be served with `status` and close the connection."""
        if self._h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # a response is already under way: all we can do is close
        body = f"{reason_phrase(status).decode()}: {reason}\n".encode("ascii", "replace")
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        try:
            data = self.response_head(status, headers)
            if not self._head_request:  # h11 refuses body bytes in an answer to a HEAD
                data += self.body_bytes(body)
            await self.send_bytes(data + self.end_bytes())
        except (h11.LocalProtocolError, ClientGone):
            pass

    # -- between requests ------------------------------------------------------------------

    def next_cycle(self) -> bool:
        """After a complete response: may the next request be read from this connection?"""
        if self._closing:
            return False
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
            self._answered = False  # that answer is complete: closing now resets nothing
            return True
        return False

    @property
    def response_complete(self) -> bool:
        return self._h11.our_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)

    async def close(self) -> None:
        """Close the connection.  If an answer went out, half-close first and read what the
        client still sends for a moment, so that unread request bytes do not make the kernel
        reset the connection before the client has read the answer."""
        with trio.CancelScope(shield=True):
            if self._answered and not self._broken:
                with trio.move_on_after(LINGER):
                    try:
                        _half_close(self.stream)
                        while await self.stream.receive_some(READ_SIZE):
                            pass
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
            await self.stream.aclose()


def _half_close(stream: trio.SocketStream) -> None:
    """End our direction of `stream` now: the client sees the end of the answer at once, not
    one pass of the run queue later (`send_eof` yields before it shuts down)."""
    if not stream.socket.did_shutdown_SHUT_WR:
        stream.socket.shutdown(socket.SHUT_WR)


_CLIENT_GONE_ERRNOS = frozenset({errno.EPIPE, errno.ECONNRESET})
