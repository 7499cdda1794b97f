"""Writing a mirrored blob straight to the client's connection (the front door's mirror path).

Why: through Quart and the ASGI driver every body chunk is copied (`bytes(body)` for the ASGI
message, h11's framing join) and passes several task hops; for a blob proxied from a peer those
copies cost about as much as hashing it.  The front door (`registry.serve.front_door`) has read the
request with h11; for a blob GET the app would mirror it hands the request here: the forwarder
runs in this connection's nursery and its pooled chunks go out through h11's data pass-through
(framing without copies), then are released.  Headers, status codes, metrics and the access line
are the same as the app's (`registry.serve.app._Registry._mirror`); misses answer with the same OCI
error body.  A body cut short leaves the response incomplete, so the front door closes the
connection.  While the mirror runs, the client's socket is watched: a client that closes it (or
resets it) has its peer fetch cancelled at once, even when no byte was due to it yet (a
`Range: bytes=-1` waits for the whole blob to be hashed).  As in nginx, a client's end of stream
counts as leaving: a registry client does not half-close and then wait for an answer.
"""

from __future__ import annotations

import logging
import socket
import time

import h11
import trio

from registry.http.connection import ServerConnection
from registry.metrics import (
    HTTP_INFLIGHT,
    MIRROR_LAST_SUCCESS,
    MIRROR_REQUESTS,
    registry_label,
)
from registry.mirror.buffers import Chunk
from registry.mirror.job import MirrorAbort, MirrorFailure, MirrorHead
from registry.oci.distribution import error_body
from registry.serve.access_log import access_logger, log_access, record_request
from registry.serve.app import MirrorPlan

__all__ = ["serve_mirror_blob"]

logger = logging.getLogger(__name__)


def _encode(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]


async def serve_mirror_blob(conn: ServerConnection, plan: MirrorPlan, ip: str, path: str) -> None:
    """Answer the planned mirror request on `conn`.  Raises ClientGone if the client went away;
    a body cut short (the peer content failed) leaves the response incomplete."""
    started = time.monotonic()
    registry = plan.job.request.reference.registry
    sent = 0
    status = 500
    HTTP_INFLIGHT.labels("/v2/*").inc()
    left = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_client, conn, nursery.cancel_scope, left)
            receive = plan.open(nursery)
            with receive:
                try:
                    try:
                        first = await receive.receive()
                    except trio.EndOfChannel:
                        first = MirrorFailure(
                            500, plan.job.request.unknown_code, "mirror ended without answer", 0
                        )
                    if isinstance(first, MirrorHead):
                        cache = "inflight" if first.inflight else "hit"
                        MIRROR_REQUESTS.labels(registry_label(registry), cache).inc()
                        MIRROR_LAST_SUCCESS.set(time.time())
                        status = first.status
                        await conn.send_bytes(
                            conn.response_head(status, _encode(list(first.headers)))
                        )
                        cut = False
                        async for item in receive:
                            if isinstance(item, Chunk):
                                try:
                                    with item.view() as view:
                                        await conn.send_view(view)
                                finally:
                                    item.release()
                                sent += len(item)
                            elif isinstance(item, bytes | bytearray):
                                await conn.send_view(item)
                                sent += len(item)
                            elif isinstance(item, MirrorAbort):
                                cut = True  # the client sees a short body and a closed connection
                                break
                        if not cut:
                            await conn.send_bytes(conn.end_bytes())
                    else:
                        MIRROR_REQUESTS.labels(registry_label(registry), "miss").inc()
                        failure = (
                            first
                            if isinstance(first, MirrorFailure)
                            else MirrorFailure(
                                500, plan.job.request.unknown_code, "mirror failed", 0
                            )
                        )
                        body = error_body(
                            failure.code, failure.message, {"attempts": failure.attempts}
                        )
                        status = failure.status
                        headers = [
                            *failure.headers,
                            ("Content-Type", "application/json"),
                            ("Content-Length", str(len(body))),
                        ]
                        await conn.send_bytes(
                            conn.response_head(status, _encode(headers))
                            + conn.body_bytes(body)
                            + conn.end_bytes()
                        )
                except h11.LocalProtocolError as exc:
                    # the peer's body did not match the length announced: cut, like an abort
                    logger.warning(
                        "mirrored body did not match its length", extra={"error": str(exc)}
                    )
                finally:
                    _drain(receive)
            nursery.cancel_scope.cancel()
        if left.is_set():
            raise conn.gone("client closed the connection while its blob was mirrored")
    finally:
        record_request("/v2/*", "GET", str(status), sent, started)
        if access_logger.isEnabledFor(logging.DEBUG):
            log_access(
                handler="mirror",
                method="GET",
                path=path,
                status=status,
                started=started,
                ip=ip,
                registry=registry,
                size=sent,
            )


async def _watch_client(conn: ServerConnection, mirror: trio.CancelScope, left: trio.Event) -> None:
    """Cancel `mirror` once the client closed or reset its connection; return if it sends more
    (a pipelined request: it is still there, and h11 reads it after this answer)."""
    sock = conn.stream.socket
    try:
        data = await sock.recv(1, socket.MSG_PEEK)
    except OSError:
        data = b""
    if not data:
        left.set()
        mirror.cancel()


def _drain(receive: trio.MemoryReceiveChannel[object]) -> None:
    """Give back the buffers of chunks still queued (the forwarder stops at its next send)."""
    while True:
        try:
            item = receive.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return
        if isinstance(item, Chunk):
            item.release()
