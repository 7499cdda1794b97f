"""Front door of the registry: h11 reads every request; local blobs go out by `os.sendfile`.

Why: Hypercorn implements no zero-copy ASGI extension, so a Quart body tops out near 2 GB/s at
~0.45 CPU-s/GiB, while `sendfile` from Trio reaches ~5 GB/s at ~0.2 CPU-s/GiB (stack notes §2.2),
beating docker-registry.  Local blob reads are what a node serves most, so they get this path.

Design (small on purpose):
- One listener, drained of every pending connection at each wakeup (`registry.http.accept`); each
  connection is a `registry.http.connection.ServerConnection`: h11 parses every request head (the
  only
  request parser), malformed ones get a 400 and a closed connection.
- For a GET/HEAD of a blob the door asks `plan_local_blob` (in `registry.serve.app`, the same code
the
  Quart route uses) whether this is a satisfiable request for a local blob backed by a readable
  file.  If so it writes the head the app would have written and `sendfile`s the bytes, framed by
  h11.  Everything else (manifests, misses, the mirror path, errors, /readyz) is answered by the
  Quart app through `registry.serve.asgi_h11` on the same connection, so keep-alive clients that mix
  manifests and blobs (containerd, peers) get sendfile for every local blob.
- A GET of a blob the app would mirror from peers is answered here too
(`registry.serve.mirror_door`):
  the forwarder's pooled chunks go to the socket without the copies the ASGI path makes.
- Limits (`ConnectionLimits`): beyond `--max-connections` open connections a new one gets a 503
  with Retry-After before any request is read, then is closed; every wait for a client to take
  response bytes ends after `--send-timeout` (the connection is cut, its slot and file freed).
- Hypercorn runs the app's lifespan; at shutdown idle connections are closed at once and running
  requests get `config.graceful_timeout`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import trio
from hypercorn.config import Config
from hypercorn.trio.lifespan import Lifespan
from hypercorn.utils import wrap_app
from quart_trio import QuartTrio

from registry.burst.own_downloads import REFUSED_HEADER
from registry.http.accept import serve_connections
from registry.http.connection import (
    DEFAULT_SEND_TIMEOUT,
    ClientGone,
    FileRange,
    HttpRequest,
    ServerConnection,
    is_client_gone,
)
from registry.interfaces import ContentNotFound
from registry.metrics import HTTP_INFLIGHT, UPLOADS_ACTIVE, UPLOADS_BUSY
from registry.mirror.transfer_report import TransferReport
from registry.oci.distribution import ErrorCode, error_body
from registry.serve.access_log import access_logger, client_ip, log_access, record_request
from registry.serve.app import (
    LocalBlob,
    MirrorPlan,
    mirror_events,
    plan_local_blob,
    plan_mirror_blob,
)
from registry.serve.asgi_h11 import Address, run_asgi, socket_addresses, split_target
from registry.serve.inflight import GrowingFile, InflightUploads, IngestBroken, upload_growing
from registry.serve.mirror_door import serve_mirror_blob

__all__ = ["DEFAULT_MAX_CONNECTIONS", "ConnectionLimits", "FastPathStats", "serve_front_door"]

DEFAULT_MAX_CONNECTIONS = 1024

logger = logging.getLogger(__name__)


class FastPathStats:
    """Requests served here (`served` with sendfile, `mirrored` from peers) and answered by the
    Quart app (`passed_on`)."""

    def __init__(self) -> None:
        self.served = 0
        self.mirrored = 0
        self.passed_on = 0
        self.refused = 0  # connections answered 503 over --max-connections

    def requests(self) -> int:
        """Requests seen so far (a running count; the idle heap trimmer watches it move)."""
        return self.served + self.mirrored + self.passed_on


class _FrontDoor:
    def __init__(
        self,
        app: QuartTrio,
        config: Config,
        state: dict[str, Any],
        stats: FastPathStats,
        head_timeout: float,
        limits: ConnectionLimits,
    ) -> None:
        self.head_timeout = head_timeout
        self.limits = limits
        self.refusing = 0  # connections being answered 503 (over the cap) right now
        self.app = app
        self.config = config
        self.state = state
        self.stats = stats
        self.connections: set[ServerConnection] = set()
        self.closing = False

    def _client_ip(self, request: HttpRequest, client: Address) -> str:
        """The requester's address (X-Forwarded-For only from --trusted-proxies)."""
        registry = self.app.extensions.get("spegla.registry")  # (absent: an app of tests)
        trusted = () if registry is None else registry.settings.trusted_proxies
        return client_ip(request.header(b"x-forwarded-for"), client[0] if client else "", trusted)

    def close_idle(self) -> None:
        self.closing = True
        for conn in self.connections:
            conn.close_idle()

    async def connection(self, stream: trio.SocketStream) -> None:
        """Serve one client connection; whatever happens, only this connection is affected."""
        limits = self.limits
        if limits.max_connections and len(self.connections) >= limits.max_connections:
            await self._refuse(stream)
            return
        conn = ServerConnection(
            stream,
            head_timeout=self.head_timeout,
            idle_timeout=self.config.keep_alive_timeout,
            send_timeout=limits.send_timeout,
        )
        if self.closing:
            conn.close_idle()
        self.connections.add(conn)
        try:
            client, server = socket_addresses(stream)
            while (request := await conn.next_request()) is not None:
                await self._answer(conn, request, client, server)
                if not conn.next_cycle():
                    break
        except Exception as exc:
            if not is_client_gone(exc):
                logger.exception("registry connection failed")
        finally:
            self.connections.discard(conn)
            await conn.close()

    async def _refuse(self, stream: trio.SocketStream) -> None:
        """Over --max-connections: a 503 with Retry-After, written before any request is read,
        then close (containerd takes it as "next host" and pulls upstream).  Refusals are
        bounded too: past a quarter of the cap more at once are closed without a word."""
        self.stats.refused += 1
        with trio.CancelScope(shield=True):
            if self.refusing >= max(1, self.limits.max_connections // 4):
                await stream.aclose()
                return
            self.refusing += 1
            try:
                with trio.move_on_after(REFUSAL_LINGER):
                    try:
                        await stream.send_all(OVER_CAPACITY)
                        await stream.send_eof()
                        while await stream.receive_some(4096):
                            pass  # unread request bytes would make the close a reset
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
            finally:
                self.refusing -= 1
                await stream.aclose()

    async def _answer(
        self, conn: ServerConnection, request: HttpRequest, client: Address, server: Address
    ) -> None:
        upload = _peer_upload_key(request)
        if upload is None:
            await self._dispatch(conn, request, client, server)
            return
        registry = self.app.extensions["spegla.registry"]
        # authentication comes before any admission or refusal: a 429 `Spegla-Refused` to a
        # client without credentials would tell it what this node is downloading (the app
        # answers such a request with a 401 before looking anything up)
        path, ns = _path_and_ns(request)
        if not registry.authorized(request.header(b"authorization"), request.method, path, ns):
            await self._dispatch(conn, request, client, server)
            return
        # a peer fetching a blob from us: bounded (--peer-upload-limit), so a burst forms a tree;
        # and never fed from a download of ours that has no source or that it feeds itself
        slots = registry.uploads
        refusal = registry.forwarder.own.refusal(upload, client[0] if client else "")
        if refusal is not None or not slots.try_acquire(
            upload, lagging=registry.inflight_uploads.lagging(LAGGING_BYTES)
        ):
            UPLOADS_BUSY.inc()
            message = "upload limit reached, ask another peer"
            if refusal is not None:
                message = refusal.message
            body = error_body(ErrorCode.TOOMANYREQUESTS, message)
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"),
            ]
            if refusal is not None:
                headers.append((REFUSED_HEADER.lower().encode(), refusal.kind.encode()))
            data = conn.response_head(429, headers) + conn.body_bytes(body) + conn.end_bytes()
            await conn.send_bytes(data)
            return
        UPLOADS_ACTIVE.inc()
        try:
            await self._dispatch(conn, request, client, server)
        finally:
            slots.release(upload)
            UPLOADS_ACTIVE.dec()

    async def _dispatch(
        self, conn: ServerConnection, request: HttpRequest, client: Address, server: Address
    ) -> None:
        if request.method in ("GET", "HEAD") and b"/blobs/" in request.target:
            plan = await self._plan(request)
            if plan is not None and await self._serve(conn, request, plan, client):
                return
            ip = self._client_ip(request, client)
            mirror = await self._plan_mirror(request, ip) if request.method == "GET" else None
            if mirror is not None:
                # a blob from peers: written here from pooled buffers (mirror_door)
                self.stats.mirrored += 1
                await serve_mirror_blob(conn, mirror, ip, split_target(request.target)[0])
                return
        self.stats.passed_on += 1
        await run_asgi(self.app, conn, request, client=client, server=server, state=self.state)

    async def _plan(self, request: HttpRequest) -> LocalBlob | None:
        path, ns = _path_and_ns(request)
        return await plan_local_blob(
            self.app,
            method=request.method,
            path=path,
            ns=ns,
            range_header=request.header(b"range"),
            authorization=request.header(b"authorization"),
            mirrored=(request.header(b"x-spegel-mirrored") or "").strip().lower() == "true",
        )

    async def _plan_mirror(self, request: HttpRequest, ip: str) -> MirrorPlan | None:
        path, ns = _path_and_ns(request)
        headers = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in request.headers
        }
        return await plan_mirror_blob(
            self.app,
            method=request.method,
            path=path,
            ns=ns,
            headers=headers,
            client_ip=ip or None,
        )

    def _still_written(self, digest: str) -> Callable[[], bool] | None:
        """Whether this node's download of `digest` is still being written (None: unknown)."""
        check: Callable[[], bool] | None = self.app.extensions["spegla.registry"].still_written(
            digest
        )
        return check

    def _report(
        self, request: HttpRequest, plan: LocalBlob, client: Address
    ) -> TransferReport | None:
        """A transfer report for a blob body going out (when the app has an events hub)."""
        events = mirror_events(self.app)
        if events is None or request.method != "GET" or not plan.length:
            return None
        ip = self._client_ip(request, client)
        report = TransferReport(
            events,
            key=plan.descriptor.digest,
            peer=ip,
            total=plan.length,
            direction="out",
            source="complete" if plan.ingest is None else "inflight",
        )
        report.start()
        return report

    async def _serve(
        self, conn: ServerConnection, request: HttpRequest, plan: LocalBlob, client: Address
    ) -> bool:
        """Send the planned response; False (nothing sent) if no readable file backs the content."""
        async with AsyncExitStack() as stack:
            fd = -1
            growing: GrowingFile | None = None
            try:
                if plan.ingest is not None:  # still downloading here: follow the growing file
                    growing = stack.enter_context(
                        GrowingFile(plan.ingest, written=self._still_written(plan.ingest.digest))
                    )
                else:
                    path = await stack.enter_async_context(plan.open())
                if request.method == "GET" and plan.length and growing is None:
                    fd = os.open(path, os.O_RDONLY)
            except (ContentNotFound, OSError):
                return False
            if fd >= 0:
                stack.callback(os.close, fd)
            started = time.monotonic()
            self.stats.served += 1
            HTTP_INFLIGHT.labels("/v2/*").inc()
            headers = [(name.encode(), value.encode()) for name, value in plan.headers.items()]
            sent = 0
            report = self._report(request, plan, client)
            try:
                head = conn.response_head(plan.status, headers)
                if growing is not None and request.method == "GET" and plan.length:
                    await conn.send_bytes(head)
                    uploads = self.app.extensions["spegla.registry"].inflight_uploads
                    sent = await _send_growing_body(conn, growing, plan, client, uploads, report)
                    await conn.send_bytes(conn.end_bytes())
                elif fd < 0:
                    await conn.send_bytes(head + conn.end_bytes())
                else:
                    await conn.send_bytes(head)
                    while sent < plan.length:  # in slices, so a long upload reports progress
                        piece = min(REPORT_SLICE, plan.length - sent)
                        sent += await conn.send_file(FileRange(fd, plan.offset + sent, piece))
                        if report is not None:
                            report.progress(sent)
                    await conn.send_bytes(conn.end_bytes())
            finally:
                if report is not None:
                    report.end(sent, ok=sent == plan.length)
                record_request("/v2/*", request.method, str(plan.status), sent, started)
                if access_logger.isEnabledFor(logging.DEBUG):
                    _log_served(request, plan, sent, started, self._client_ip(request, client))
        return True


REPORT_SLICE = 8 << 20  # bytes per sendfile call between progress reports
REFUSAL_LINGER = 1.0  # a refused connection is closed after at most this long
_REFUSAL_BODY = b"too many connections to this registry, try again later\n"
# written before a request was read, so not through h11 (it frames answers to requests only)
OVER_CAPACITY = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: " + str(len(_REFUSAL_BODY)).encode() + b"\r\n"
    b"retry-after: 1\r\n"
    b"connection: close\r\n"
    b"\r\n" + _REFUSAL_BODY
)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """--max-connections (0: no cap; beyond it a clean 503) and --send-timeout (a client that
    takes no response bytes for this long is cut, its upload slot and file freed)."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    send_timeout: float = DEFAULT_SEND_TIMEOUT


async def _send_growing_body(
    conn: ServerConnection,
    growing: GrowingFile,
    plan: LocalBlob,
    client: Address,
    uploads: InflightUploads,
    report: TransferReport | None,
) -> int:
    """The body of a blob still downloading (registry.serve.inflight); a failed download closes the
    connection (the requester sees a short body and resumes elsewhere)."""

    async def send_range(offset: int, count: int) -> None:
        await conn.send_file(FileRange(growing.fd, offset, count))

    ip = client[0] if client else ""
    try:
        return await upload_growing(
            growing, plan.offset, plan.length, ip, send_range, uploads, report
        )
    except IngestBroken as exc:
        raise ClientGone(f"in-flight upload cut: {exc}") from exc


LAGGING_BYTES = 2 * 1024 * 1024  # an in-flight upload this far behind the download: uplink-bound


def _peer_upload_key(request: HttpRequest) -> str | None:
    """The blob a peer (X-Spegel-Mirrored: true) is GETting from us, else None."""
    if request.method != "GET" or b"/blobs/" not in request.target:
        return None
    if (request.header(b"x-spegel-mirrored") or "").strip().lower() != "true":
        return None
    path = split_target(request.target)[0]
    return path.rsplit("/blobs/", 1)[1] or None


def _log_served(request: HttpRequest, plan: LocalBlob, sent: int, started: float, ip: str) -> None:
    """The DEBUG access line of a request served here (as the app writes for its own)."""
    log_access(
        handler="blob",
        method=request.method,
        path=split_target(request.target)[0],
        status=plan.status,
        started=started,
        ip=ip,
        registry=plan.headers.get("oci-namespace", ""),
        size=sent,
    )


async def serve_front_door(
    app: QuartTrio,
    config: Config,
    sock: trio.socket.SocketType,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None,
    stats: FastPathStats,
    head_timeout: float = 10.0,
    limits: ConnectionLimits | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve on the listening `sock` until `shutdown_trigger` returns, then drain gracefully.

    A request head must arrive within `head_timeout` seconds once it has started; `limits`:
    the connection cap and the send deadline.
    """
    hypercorn_app = wrap_app(app, config.wsgi_max_body_size, None)
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(hypercorn_app, config, lifespan_state)
    door = _FrontDoor(
        app, config, lifespan_state, stats, head_timeout, limits or ConnectionLimits()
    )
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as server_nursery:
            async with trio.open_nursery() as accept_nursery:
                accept_nursery.start_soon(serve_connections, sock, door.connection, server_nursery)
                task_status.started()
                if shutdown_trigger is not None:
                    await shutdown_trigger()
                else:
                    await trio.sleep_forever()
                accept_nursery.cancel_scope.cancel()
            sock.close()
            door.close_idle()
            server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


def _path_and_ns(request: HttpRequest) -> tuple[str, str | None]:
    """The request's path and its first `ns` query value (the mirrored registry), if any."""
    path, _, query = split_target(request.target)
    ns_values = parse_qs(query.decode("latin-1")).get("ns")
    return path, ns_values[0] if ns_values else None
