"""Writing a mirrored blob straight to the client's socket (the front door's mirror path).

Why: through Quart and Hypercorn every body chunk is copied twice (`bytes(body)` for the ASGI
message, h11's framing) and passes several task hops; for a blob proxied from a peer those copies
cost about as much as hashing it.  The front door (`registry.fastpath`) already parses the
request head; for a blob GET the app would mirror it hands the request here: the forwarder runs in
this connection's nursery and its pooled chunks are written to the socket as they are, then
released.  Headers, status codes, metrics and the access line are the same as the app's
(`registry.app._Registry._mirror`); misses answer with the same OCI error body.
"""

from __future__ import annotations

import email.utils
import logging
import time

import trio

from registry.access_log import access_logger, log_access, record_request
from registry.app import MirrorPlan
from registry.buffers import Chunk
from registry.distribution import error_body
from registry.metrics import HTTP_INFLIGHT, MIRROR_LAST_SUCCESS, MIRROR_REQUESTS
from registry.mirror_job import MirrorAbort, MirrorFailure, MirrorHead

__all__ = ["serve_mirror_blob"]

logger = logging.getLogger(__name__)

_REASONS = {200: "OK", 206: "Partial Content", 404: "Not Found", 416: "Range Not Satisfiable"}


def _head_bytes(status: int, headers: list[tuple[str, str]], keep_alive: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
    lines += [f"{name.lower()}: {value}" for name, value in headers]
    lines.append(f"date: {email.utils.formatdate(usegmt=True)}")
    if not keep_alive:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def serve_mirror_blob(
    stream: trio.SocketStream, plan: MirrorPlan, keep_alive: bool, ip: str, path: str
) -> bool:
    """Answer the planned mirror request on `stream`; False if the connection must close.

    The connection must close when the body was cut short (the peer content failed) or the
    client went away; a complete response (hit or miss) leaves it open for the next request.
    """
    started = time.monotonic()
    registry = plan.job.request.reference.registry
    sent = 0
    status = 500
    complete = False
    HTTP_INFLIGHT.labels("/v2/*").inc()
    try:
        async with trio.open_nursery() as nursery:
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
                        MIRROR_REQUESTS.labels(registry, "hit").inc()
                        MIRROR_LAST_SUCCESS.set(time.time())
                        status = first.status
                        await stream.send_all(_head_bytes(status, list(first.headers), keep_alive))
                        complete = True
                        async for item in receive:
                            if isinstance(item, Chunk):
                                try:
                                    with item.view() as view:
                                        await stream.send_all(view)
                                finally:
                                    item.release()
                                sent += len(item)
                            elif isinstance(item, bytes | bytearray):
                                await stream.send_all(item)
                                sent += len(item)
                            elif isinstance(item, MirrorAbort):
                                complete = False  # cut short: the client sees a short body
                                break
                    else:
                        MIRROR_REQUESTS.labels(registry, "miss").inc()
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
                        await stream.send_all(_head_bytes(status, headers, keep_alive) + body)
                        complete = True
                finally:
                    _drain(receive)
            nursery.cancel_scope.cancel()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        complete = False
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
    return complete and keep_alive


def _drain(receive: trio.MemoryReceiveChannel[object]) -> None:
    """Give back the buffers of chunks still queued (the forwarder stops at its next send)."""
    while True:
        try:
            item = receive.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return
        if isinstance(item, Chunk):
            item.release()
