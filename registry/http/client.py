"""A small HTTP/1.1 client for fetching from peer registries: h11 over Trio TCP streams.

Why our own: a peer body is proxied at memory speed only if each read takes what the kernel has
(httpcore reads at most 64 KiB per `receive_some`, a scheduler pass per 64 KiB of body).  Here reads
are up to `read_size` (1 MiB) and the body is handed out in the sizes the kernel returns.  Idle
keep-alive connections are pooled per peer, so a hit costs no handshake.  There are no timeouts
inside: callers bound every step with Trio cancel scopes.

Usage::

    async with client.request(peer_host, peer_port, "GET", "/v2/...?ns=...", headers) as resp:
        resp.status, resp.headers["content-length"]
        while (chunk := await resp.receive()) is not None: ...

A response leaves its connection in the pool only when its body was read to the end.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import h11
import trio

from registry.http.dial import connect_first

__all__ = ["PeerClient", "PeerError", "PeerResponse"]

logger = logging.getLogger(__name__)

READ_SIZE = 1024 * 1024
# the read that proves a body is flowing (`PeerResponse.first_bytes`): small, it is handed on as is
FIRST_READ = 64 * 1024
MAX_REACHED = 4096  # peers whose winning address is remembered


class PeerError(Exception):
    """The peer could not be reached, broke the protocol, or closed the connection early."""


@dataclass(slots=True)
class _Connection:
    stream: trio.SocketStream
    h11: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
    idle_since: float = 0.0  # trio clock time it was put in the pool


class PeerResponse:
    """Status, lower-cased headers and the body of one peer response."""

    def __init__(
        self, conn: _Connection, response: h11.Response, read_size: int, method: str
    ) -> None:
        self._conn = conn
        self._read_size = read_size
        self.status: int = response.status_code
        self.headers: dict[str, str] = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in response.headers
        }
        self.complete = False
        self.reusable = True  # False once the connection must not carry another request
        # A Content-Length body is read straight from the socket into `read_size` buffers
        # (h11 would copy it twice, in pieces as small as the kernel hands out).
        self._remaining: int | None = None
        self._pending: bytes | bytearray = b""
        length = self.headers.get("content-length", "")
        if (
            method != "HEAD"
            and self.status not in (204, 304)
            and self.status >= 200
            and "transfer-encoding" not in self.headers
            and length.isascii()
            and length.isdigit()  # (h11 has checked it already: digits only, ASCII)
        ):
            self._remaining = int(length)
            self._pending, _ = conn.h11.trailing_data
            if len(self._pending) > self._remaining:
                raise PeerError("peer sent more than its Content-Length")
            if "close" in self.headers.get("connection", "").lower():
                self.reusable = False

    @property
    def peer_ip(self) -> str:
        """The address this response came from (the one a name or a peer's several addresses
        reached); "" if the socket no longer knows it."""
        try:
            return str(self._conn.stream.socket.getpeername()[0])
        except OSError:
            return ""

    async def first_bytes(self) -> None:
        """Wait until the body's first bytes are here; they stay for the next `receive`.

        Returns at once for a body that is empty, complete, or already has bytes waiting (they
        came with the head).  A peer that sends its head and then nothing is still waiting here:
        the caller bounds it (and races another peer meanwhile, `registry.mirror.peer_race`).
        """
        if self.complete or self._pending:
            return
        if self._remaining is None:
            data = await self._next_data()
            if data is not None:
                self._pending = data  # handed out first by `_next_data`/`_chunked_into`
            return
        if self._remaining == 0:
            return
        buffer = bytearray(min(FIRST_READ, self._remaining))
        n = await self._read_socket(memoryview(buffer), len(buffer))
        del buffer[n:]
        self._pending = buffer

    async def receive(self) -> bytes | bytearray | None:
        """The next piece of the body, or None once the body is complete."""
        if self.complete:
            return None
        if self._remaining is None:
            return await self._next_data()
        buffer = bytearray(min(self._read_size, self._remaining) or 1)
        filled = await self.receive_into(memoryview(buffer))
        if filled == 0:
            return None
        del buffer[filled:]
        return buffer

    async def receive_into(self, view: memoryview) -> int:
        """Read body bytes into `view`; 0 once the body is complete.

        Reads straight from the socket (non-blocking `readv` on its descriptor) until `view` is
        full or no more bytes are waiting; it waits only while nothing has been read yet.  So a
        fast peer fills big buffers with few system calls and no copies in Python.
        """
        if self.complete or not len(view):
            return 0
        if self._remaining is None:
            return await self._chunked_into(view)
        want = min(len(view), self._remaining)
        if want == 0:
            self._finish_direct()
            return 0
        if self._pending:
            n = min(want, len(self._pending))
            view[:n] = self._pending[:n]
            self._pending = self._pending[n:]
            await trio.lowlevel.checkpoint()
        else:
            n = await self._read_socket(view, want)
        self._remaining -= n
        if self._remaining == 0:
            self._finish_direct()
        return n

    async def _read_socket(self, view: memoryview, want: int) -> int:
        sock = self._conn.stream.socket
        fd = sock.fileno()
        filled = 0
        waited = False
        while filled < want:
            try:
                n = os.readv(fd, [view[filled:want]])
            except BlockingIOError:
                if filled:
                    break  # hand on what we have rather than wait for more
                await trio.lowlevel.wait_readable(sock)
                waited = True
                continue
            except OSError as exc:
                raise PeerError(f"connection to peer broke: {exc}") from None
            if n == 0:
                if filled:
                    break
                raise PeerError("peer closed the connection before the body was complete")
            filled += n
        if not waited:
            await trio.lowlevel.checkpoint()
        return filled

    def _finish_direct(self) -> None:
        self.complete = True
        # the h11 state machine never saw this body: the next request starts afresh
        self._conn.h11 = h11.Connection(h11.CLIENT)

    async def _chunked_into(self, view: memoryview) -> int:
        if not self._pending:
            data = await self._next_data()
            if data is None:
                return 0
            self._pending = data
        n = min(len(view), len(self._pending))
        view[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    async def _next_data(self) -> bytes | None:
        """The next h11 Data of a body not framed by Content-Length; None at its end."""
        if self._pending:
            data, self._pending = bytes(self._pending), b""
            return data
        conn = self._conn
        while True:
            event = await _next_event(conn, self._read_size)
            if event is None:
                try:
                    conn.h11.receive_data(b"")
                    last = conn.h11.next_event()
                except h11.RemoteProtocolError as exc:
                    raise PeerError(f"peer closed the connection early: {exc}") from None
                if isinstance(last, h11.EndOfMessage):
                    self.complete = True
                    return None
                raise PeerError("peer closed the connection before the body was complete")
            if isinstance(event, h11.Data):
                if event.data:
                    return bytes(event.data)
                continue
            if isinstance(event, h11.EndOfMessage):
                self.complete = True
                return None
            raise PeerError(f"unexpected HTTP event from peer: {type(event).__name__}")


IDLE_TIMEOUT = 20.0  # below the peers' keep-alive (30 s): an older idle connection is closed
MAX_HOSTS = 256  # peers (host, port, kind) with idle connections pooled


class PeerClient:
    """Opens requests to peers, reusing idle keep-alive connections.

    Bounds: at most `max_idle` idle connections per peer, pools for at most `max_hosts` peers
    (the least recently used pool is closed first) and none idle longer than `idle_timeout`
    seconds (a peer may have closed it meanwhile; its socket would linger until reused).
    """

    def __init__(
        self,
        *,
        read_size: int = READ_SIZE,
        max_idle: int = 8,
        idle_timeout: float = IDLE_TIMEOUT,
        max_hosts: int = MAX_HOSTS,
    ) -> None:
        self._read_size = read_size
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        self._max_hosts = max_hosts
        self._swept = 0.0  # when expired idle connections were last looked for
        # least recently used first (a pool is moved to the end when a connection joins it)
        self._idle: dict[tuple[str, int, str], list[_Connection]] = {}
        # peers with several addresses: the one that last won the dial race, tried first next
        # time (a blackholed first address then costs one stagger per peer, not per connection)
        self._reached: dict[tuple[str, int], str] = {}

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                await conn.stream.aclose()

    @asynccontextmanager
    async def request(
        self,
        host: str,
        port: int,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]] = (),
        *,
        also: Sequence[str] = (),
    ) -> AsyncIterator[PeerResponse]:
        """Send a request and yield the response once its headers arrived.

        `also`: other addresses of the same peer; a new connection races them with `host`
        (`registry.http.dial`).  Idle connections are pooled by `host`, whichever address they
        reached.
        """
        # Blob fetches get connections of their own: a long body never holds up a manifest or a
        # HEAD queued behind it on the same kept-alive connection.
        key = (host, port, "blobs" if "/blobs/" in target else "other")
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        request = h11.Request(method=method, target=target, headers=[("Host", authority), *headers])
        conn, response = await self._exchange(key, request, also)
        reusable = False
        try:
            resp = PeerResponse(conn, response, self._read_size, method)
            yield resp
            if resp.complete and resp.reusable:
                if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
                    conn.h11.start_next_cycle()
                reusable = conn.h11.our_state is h11.IDLE and conn.h11.their_state is h11.IDLE
        finally:
            closing = [] if reusable else [conn]
            if reusable:
                closing = self._pool(key, conn)
            if closing:
                with trio.CancelScope(shield=True):
                    for stale in closing:
                        await stale.stream.aclose()

    def _pool(self, key: tuple[str, int, str], conn: _Connection) -> list[_Connection]:
        """Keep `conn` idle for reuse; the connections that must be closed now (it, if its pool
        is full; the pools beyond `max_hosts`; idle ones past `idle_timeout`)."""
        now = trio.current_time()
        conn.idle_since = now
        pool = self._idle.pop(key, [])
        self._idle[key] = pool  # most recently used last
        closing: list[_Connection] = []
        if len(pool) < self._max_idle:
            pool.append(conn)
        else:
            closing.append(conn)
        while len(self._idle) > self._max_hosts:
            closing.extend(self._idle.pop(next(iter(self._idle))))
        if now - self._swept >= self._idle_timeout / 2:
            self._swept = now
            for peer in list(self._idle):
                fresh: list[_Connection] = []
                for idle in self._idle[peer]:
                    stale = now - idle.idle_since > self._idle_timeout
                    (closing if stale else fresh).append(idle)
                if fresh:
                    self._idle[peer] = fresh
                else:
                    del self._idle[peer]
        return closing

    def idle_connections(self) -> int:
        """Idle connections pooled now (all peers)."""
        return sum(len(pool) for pool in self._idle.values())

    async def _exchange(
        self, key: tuple[str, int, str], request: h11.Request, also: Sequence[str] = ()
    ) -> tuple[_Connection, h11.Response]:
        pool = self._idle.get(key)
        while pool:
            conn = pool.pop()
            if not pool:
                del self._idle[key]
            if trio.current_time() - conn.idle_since > self._idle_timeout:
                await conn.stream.aclose()  # the peer may have closed it: do not try
                continue
            try:
                return conn, await self._send(conn, request)
            except PeerError:
                # a pooled connection the peer has closed meanwhile: try the next one
                await conn.stream.aclose()
        try:
            if also:
                stream = await self._dial_several(key[0], key[1], also)
            else:
                stream = await trio.open_tcp_stream(key[0], key[1])
        except OSError as exc:
            raise PeerError(f"cannot connect to {key[0]}:{key[1]}: {exc}") from None
        conn = _Connection(stream)
        try:
            return conn, await self._send(conn, request)
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise

    async def _dial_several(self, host: str, port: int, also: Sequence[str]) -> trio.SocketStream:
        preferred = self._reached.get((host, port))
        hosts = [host, *also]
        if preferred in hosts:
            hosts.remove(preferred)
            hosts.insert(0, preferred)
        stream = await connect_first(hosts, port)
        reached = str(stream.socket.getpeername()[0])
        self._reached.pop((host, port), None)
        if reached != host:
            self._reached[(host, port)] = reached
            while len(self._reached) > MAX_REACHED:
                del self._reached[next(iter(self._reached))]
        return stream

    async def _send(self, conn: _Connection, request: h11.Request) -> h11.Response:
        try:
            payload = (conn.h11.send(request) or b"") + (conn.h11.send(h11.EndOfMessage()) or b"")
            await conn.stream.send_all(payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise PeerError(f"cannot send request to peer: {exc}") from None
        except h11.LocalProtocolError as exc:
            raise PeerError(f"invalid request: {exc}") from None
        while True:
            event = await _next_event(conn, self._read_size)
            if event is None:
                raise PeerError("peer closed the connection without answering")
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                return event
            raise PeerError(f"unexpected HTTP event from peer: {type(event).__name__}")


async def _next_event(conn: _Connection, read_size: int) -> h11.Event | None:
    """The next h11 event, reading from the peer as needed; None once the peer closed first."""
    while True:
        try:
            event = conn.h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise PeerError(f"peer broke HTTP/1.1: {exc}") from None
        if isinstance(event, h11.Event):
            return event
        if event is h11.PAUSED:
            raise PeerError(f"unexpected HTTP event from peer: {type(event).__name__}")
        try:
            data = await conn.stream.receive_some(read_size)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise PeerError(f"connection to peer broke: {exc}") from None
        if not data:
            return None
        conn.h11.receive_data(data)
