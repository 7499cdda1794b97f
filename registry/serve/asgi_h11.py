"""Runs the Quart app for one request read by `registry.http.connection` (a minimal ASGI HTTP
driver).

Why: the front door reads every request with h11 once; handing the raw bytes on to Hypercorn to
be parsed a second time (and following its response bytes to learn when it was done) is what the
one-parser rule removes.  This driver gives the app the ASGI `http` scope Hypercorn would give it
and frames the app's `http.response.*` messages with the same h11 connection, so keep-alive and
pipelining are h11's business.  Hypercorn still runs the app's lifespan (startup/shutdown) and
serves the app when the zero-copy front door is switched off.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import h11
import trio

from registry.http.connection import ClientGone, HttpRequest, ServerConnection, is_client_gone
from registry.serve.app import MirrorAborted

__all__ = ["AsgiApp", "run_asgi", "split_target"]

logger = logging.getLogger(__name__)

AsgiApp = Any  # an ASGI 3 application: await app(scope, receive, send)
Address = tuple[str, int] | None


def split_target(target: bytes) -> tuple[str, bytes, bytes]:
    """(decoded path, raw path, query string) of a request target, origin- or absolute-form."""
    text = target.decode("latin-1")
    if not text.startswith("/") and "://" in text:  # absolute-form: http://host/path?query
        parts = urlsplit(text)
        raw_path = (parts.path or "/").encode("latin-1")
        query = parts.query.encode("latin-1")
    else:
        raw_path, _, query = target.partition(b"?")
    path = unquote(raw_path.decode("latin-1"), encoding="latin-1")
    return path, raw_path, query


def socket_addresses(stream: trio.SocketStream) -> tuple[Address, Address]:
    """(client, server) addresses of a connection, as ASGI scopes carry them."""

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


async def run_asgi(
    app: AsgiApp,
    conn: ServerConnection,
    request: HttpRequest,
    *,
    client: Address,
    server: Address,
    state: dict[str, Any],
) -> None:
    """Let `app` answer `request` on `conn`.  If the app fails before answering, the client gets
    a 500; if it fails midway, the response is cut (the caller closes the connection, seeing the
    response incomplete).  Raises ClientGone when the client went away."""
    path, raw_path, query = split_target(request.target)
    scope: dict[str, Any] = {
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
        "extensions": {},
        "state": state.copy(),
    }
    head_only = request.method == "HEAD"
    pending_head = b""
    started = False
    finished = trio.Event()
    body_given = False

    async def receive() -> dict[str, Any]:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal pending_head, started
        kind = message["type"]
        if kind == "http.response.start":
            if started:
                raise RuntimeError("response started twice")
            started = True
            headers = [(bytes(k).lower(), bytes(v)) for k, v in message.get("headers", ())]
            # held back so that the head and the first body part go out in one write
            pending_head = conn.response_head(int(message["status"]), headers)
        elif kind == "http.response.body":
            if not started or finished.is_set():
                raise RuntimeError("response body outside a response")
            body = message.get("body", b"")
            data = pending_head
            pending_head = b""
            if body and not head_only:
                data += conn.body_bytes(body)
            if not message.get("more_body", False):
                data += conn.end_bytes()
                finished.set()
            await conn.send_bytes(data)

    try:
        await app(scope, receive, send)
    except ClientGone:
        raise
    except Exception as exc:
        if not _is_expected(exc):
            logger.warning("registry request failed", extra={"error": repr(exc), "path": path})
    finally:
        finished.set()
    if not started and conn.response_complete is False:
        try:
            await conn.send_bytes(
                conn.response_head(500, [(b"content-length", b"0")]) + conn.end_bytes()
            )
        except h11.LocalProtocolError:
            pass


def _is_expected(exc: BaseException) -> bool:
    """The client went away, or a mirrored body was cut on purpose (the forwarder logged it)."""
    if isinstance(exc, MirrorAborted) or is_client_gone(exc):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_expected(inner) for inner in exc.exceptions)
    return False
