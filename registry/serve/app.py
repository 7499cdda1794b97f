"""The registry's face: a Quart-Trio app serving the OCI pull API, /readyz and /livez.

Why this shape: `Registry` holds what outlives a request (the store, the forwarder, the peer
upload slots, the task tree of mirror fetches and claims: `Registry.run`, started by the agent
whichever server serves the app); `create_app` builds the Quart app on it.  Each request is
classified once (`registry.serve.classify`: authentication, path, filters, range, then one store
lookup), admitted once if it is a peer's blob GET (upload slots, own-download refusals: after
authentication and before the lookup), and answered (`registry.serve.answers`, bodies in
`registry.serve.bodies`).  Every other method or path is a 404 with an empty body, like Spegel.
Malformed names, tags, digests and `ns` values get a 404 (what containerd treats as "next host")
whose OCI error body says what was wrong; malformed ranges 400, unsatisfiable ranges 416.
A peer's cluster-key credential is accepted instead of the Basic password, and a manifest answered
to it carries the proof the requester needs to use it for a tag (`registry.auth.peer`); without
the key a tag is never resolved through peers (404).  Invariant: a peer upload slot is held from
admission until the response is over (sent, cut, or abandoned by its client).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast
from urllib.parse import unquote_plus

import trio
from quart import request
from quart_trio import QuartTrio

from registry.auth.basic import BasicAuth
from registry.auth.peer import PeerAuth
from registry.burst.claim_supply import ClaimParticipation
from registry.burst.own_downloads import FED_BY_HEADER, REFUSED_HEADER
from registry.burst.provider_choice import UploadSlots
from registry.events import MirrorEvents
from registry.http.client import PeerClient
from registry.interfaces import (
    ContentNotFound,
    ContentStore,
    DownloadDiscarder,
    Router,
)
from registry.metrics import UPLOADS_ACTIVE, UPLOADS_BUSY, set_label_registries
from registry.mirror.forwarder import Forwarder
from registry.mirror.job import MirrorItem, MirrorJob, MirrorSettings
from registry.mirror.peer_answer import Quarantine
from registry.mirror.transfer_report import TransferReport
from registry.oci.distribution import ErrorCode
from registry.oci.filters import ReferenceFilter
from registry.serve.access_log import TrustedProxies, client_ip, with_request_metrics
from registry.serve.answers import blob_answer, manifest_answer, mirror_answer, simple_answer
from registry.serve.bodies import ChannelItems, GrowingBody, StoredBody
from registry.serve.classify import (
    MIRRORED_HEADER,
    Empty,
    InflightBlob,
    LocalBlob,
    LocalManifest,
    Mirror,
    OciError,
    Plan,
    Readiness,
    RequestFacts,
    Rules,
    StoreFaces,
    Unauthorized,
    Wanted,
    classify,
    decide,
    look_up,
)
from registry.serve.connection import CLIENT_WATCH, AnswerStats, ClientWatch, RegistryConnection
from registry.serve.inflight import InflightUploads
from registry.serve.responses import Response, empty_response

__all__ = ["Registry", "RegistrySettings", "create_app"]

logger = logging.getLogger(__name__)
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
DIRECT_METHODS = frozenset(ALL_METHODS)
DIRECT_PATHS = frozenset(("/v2", "/readyz", "/livez"))
LAGGING_BYTES = 2 * 1024 * 1024  # an in-flight upload this far behind the download: uplink-bound
FINISHERS = "spegla.finishers"  # scope key: what runs once the response is over
FACT_HEADERS = frozenset(
    (b"authorization", b"range", MIRRORED_HEADER.lower().encode(), b"x-forwarded-for", b"accept")
)


@dataclass(frozen=True, slots=True)
class RegistrySettings:
    """How the registry serves (flag values of `spegla registry`); mirroring is `mirror`'s."""

    # the mirror path's deadlines and limits (resolve timeout and retries, response and stall
    # timeouts, verify-first size): their defaults live in `MirrorSettings` only
    mirror: MirrorSettings = field(default_factory=MirrorSettings)
    filters: ReferenceFilter | None = None  # --mirrored-registries / --registry-filters
    readiness: Callable[[], bool] | None = None  # default: router.ready
    read_size: int = 1024 * 1024  # chunk size for local reads and peer socket reads
    channel_depth: int = 4  # chunks buffered between the mirror task and the response
    # Registry assumed for requests without `ns` (clients that talk to us directly, e.g.
    # skopeo).  None, as in Spegel: such requests are 404.
    default_registry: str | None = None
    # Basic auth (Spegel's basic-auth Secret): required on every route but the probes, and sent
    # to peers (the forwarder's `MirrorSettings.authorization` is set from it).  None: off.
    basic_auth: BasicAuth | None = None
    # The cluster key's peer credentials: accepted in place of Basic auth, sent to peers instead
    # of the password, and the only way a tag is resolved through peers.  None: no key.
    peer_auth: PeerAuth | None = None
    # --peer-upload-limit: blob GETs from peers served at once; beyond it a peer gets 429 with
    # Retry-After and asks another provider (a burst then forms a tree).  0: no limit.
    peer_upload_limit: int = 8
    # --trusted-proxies: X-Forwarded-For is read only from these (`access_log.client_ip`)
    trusted_proxies: TrustedProxies = ()


class Registry:
    """The registry's parts that outlive a request, and its task tree (`run`)."""

    def __init__(
        self,
        store: ContentStore,
        router: Router,
        settings: RegistrySettings | None = None,
        *,
        events: MirrorEvents | None = None,
        claims: ClaimParticipation | None = None,
        uploads: InflightUploads | None = None,
    ) -> None:
        """`uploads`: where its uploads of blobs still downloading are counted (None: its own)."""
        settings = settings or RegistrySettings()
        self.store = store
        self.router = router
        self.settings = settings
        self.claims = claims
        filters = settings.filters or ReferenceFilter()
        set_label_registries(filters.registries)
        self.rules = Rules(
            filters, settings.default_registry, settings.basic_auth, settings.peer_auth
        )
        self.readiness = settings.readiness or router.ready
        mirror = settings.mirror
        if settings.basic_auth is not None:
            mirror = replace(mirror, authorization=settings.basic_auth.header_value)
        if settings.peer_auth is not None:
            mirror = replace(mirror, peer_auth=settings.peer_auth)
        self.forwarder = Forwarder(
            router,
            PeerClient(read_size=settings.read_size),
            mirror,
            Quarantine(),
            events=events,
            claims=claims,
            discard=store if isinstance(store, DownloadDiscarder) else None,
        )
        self.faces = StoreFaces.of(store)
        self.uploads = UploadSlots(settings.peer_upload_limit)
        # this registry's uploads of blobs still downloading here (debug page, `lagging`)
        self.inflight_uploads = uploads if uploads is not None else InflightUploads()
        self.stats = AnswerStats()
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The task tree of the registry: every request's mirror fetch, the shared fetches that
        outlive the request that started them, and claims' holds run in this nursery, whichever
        server serves the app.  Before `run` started (and after it ended) a request that would be
        answered from peers gets a 503."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.forwarder.background = nursery  # a shared fetch outlives its first GET
                if self.claims is not None:
                    self.claims.background = nursery  # a claimant's claim outlives its request
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self.forwarder.background = None
            if self.claims is not None:
                self.claims.background = None
            with trio.CancelScope(shield=True):
                await self.forwarder.client.aclose()

    # --- one request ------------------------------------------------------------------------

    async def handle(self, scope: dict[str, Any], path: str) -> Response:
        """Classify the request of `scope` once, admit it, look it up once, answer it."""
        facts = self._facts(scope, path)
        plan = classify(facts, self.rules)
        if not isinstance(plan, Wanted):
            return await self._answer(plan, facts, scope)
        if plan.upload is not None:
            admitted = self._admit(plan.upload, facts.remote)
            if isinstance(admitted, OciError):
                return simple_answer(admitted)
            # the slot is held until the response is over (create_app's wrapper runs this)
            scope.setdefault(FINISHERS, []).append(admitted)
        found = await look_up(plan, self.store, self.faces)
        return await self._answer(decide(plan, found, self.rules), facts, scope)

    def _facts(self, scope: dict[str, Any], path: str) -> RequestFacts:
        wanted: dict[bytes, str] = {}  # the first value of each header classification reads
        for name, value in scope["headers"]:
            key = name.lower()
            if key in FACT_HEADERS and key not in wanted:
                wanted[key] = value.decode("latin-1")
        client = scope.get("client")
        remote = str(client[0]) if client else ""
        trusted = self.settings.trusted_proxies
        return RequestFacts(
            method=scope["method"],
            path=path,
            ns=query_value(scope["query_string"], "ns"),
            authorization=wanted.get(b"authorization"),
            range_header=wanted.get(b"range"),
            mirrored=wanted.get(b"x-spegel-mirrored", "").strip().lower() == "true",
            client_ip=client_ip(wanted.get(b"x-forwarded-for"), remote, trusted),
            remote=remote,
            accept=wanted.get(b"accept"),
        )

    def _admit(self, digest: str, remote: str) -> OciError | Callable[[], None]:
        """A peer's GET of `digest`: bounded (--peer-upload-limit), so a burst forms a tree; and
        never fed from a download of ours that has no source or that it feeds itself.  The slot's
        release, or the 429 to answer."""
        refusal = self.forwarder.own.refusal(digest, remote)
        if refusal is not None or not self.uploads.try_acquire(
            digest, lagging=self.inflight_uploads.lagging(LAGGING_BYTES)
        ):
            UPLOADS_BUSY.inc()
            self.stats.refused += 1
            headers: tuple[tuple[str, str], ...] = (("Retry-After", "1"),)
            message = "upload limit reached, ask another peer"
            if refusal is not None:
                message = refusal.message
                headers += ((REFUSED_HEADER, refusal.kind),)
            return OciError(429, ErrorCode.TOOMANYREQUESTS, message, headers)
        UPLOADS_ACTIVE.inc()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.uploads.release(digest)
                UPLOADS_ACTIVE.dec()

        return release

    async def _answer(self, plan: Plan, facts: RequestFacts, scope: dict[str, Any]) -> Response:
        if isinstance(plan, Empty | OciError | Unauthorized):
            return simple_answer(plan)
        if isinstance(plan, Readiness):
            try:
                ready = self.readiness()
            except Exception as exc:
                logger.warning("readiness check failed", extra={"error": str(exc)})
                ready = False
            return empty_response(200 if ready else 500)
        if isinstance(plan, LocalManifest):
            return await self._manifest(plan)
        if isinstance(plan, LocalBlob):
            report = self._report(plan.descriptor.digest, plan, facts, "complete")
            body = StoredBody(self.store, plan.descriptor, plan.offset, _body_length(plan), report)
            return blob_answer(plan.status, plan.headers, body)
        if isinstance(plan, InflightBlob):
            return self._inflight(plan, facts)
        return await self._mirror(plan, scope)

    async def _manifest(self, plan: LocalManifest) -> Response:
        body = None
        if not plan.head_only:
            try:
                async with self.store.open(plan.descriptor.digest) as reader:
                    body = b"".join([chunk async for chunk in reader.read(0, reader.size)])
            except ContentNotFound:
                body = None
        proof = None
        auth = self.settings.peer_auth
        if plan.credential is not None and auth is not None:
            proof = auth.answer_proof(plan.credential.nonce, plan.descriptor.digest, plan.reference)
        return manifest_answer(plan, body, proof)

    def _inflight(self, plan: InflightBlob, facts: RequestFacts) -> Response:
        digest = plan.ingest.digest
        headers = plan.headers
        if fed_by := self.forwarder.own.fed_by(digest):
            headers += ((FED_BY_HEADER, ",".join(fed_by)),)  # see registry.burst.own_downloads
        inflight = self.faces.inflight
        written = None
        if inflight is not None:
            # does a process still write it? (the store's table drops a download nobody writes)
            written = lambda: inflight.find_inflight(digest) is not None  # noqa: E731
        report = self._report(digest, plan, facts, "inflight")
        body = GrowingBody(
            self.inflight_uploads,
            plan.ingest,
            plan.offset,
            _body_length(plan),
            facts.remote,
            written,
            report,
        )
        return blob_answer(plan.status, headers, body)

    def _report(
        self, digest: str, plan: LocalBlob | InflightBlob, facts: RequestFacts, source: str
    ) -> TransferReport | None:
        """A transfer report for a blob body going out (debug page)."""
        if plan.head_only or not plan.length:
            return None
        return TransferReport(
            self.forwarder.events,
            key=digest,
            peer=facts.client_ip,
            total=plan.length,
            direction="out",
            source=source,
        )

    async def _mirror(self, plan: Mirror, scope: dict[str, Any]) -> Response:
        job = plan.job
        scope["spegla.mirrored"] = True  # access log: "mirror"
        self.stats.mirrored += 1
        nursery = self._nursery
        if nursery is None:
            return simple_answer(
                OciError(503, job.request.unknown_code, "the registry is not running")
            )
        watch = scope.get(CLIENT_WATCH)
        if isinstance(watch, ClientWatch):
            # a client that leaves cancels this request and its fetch at once (even one whose
            # end of stream came before this point); the watch ends with the request
            scope.setdefault(FINISHERS, []).append(watch.start(nursery))
        # a blob GET reads the shared fetch of its blob itself; the rest get a fetch task each
        shared = self.forwarder.open_shared(job)
        if shared is not None:
            return await mirror_answer(job, shared)
        send, receive = trio.open_memory_channel[MirrorItem](self.settings.channel_depth)
        fetch = trio.CancelScope()
        nursery.start_soon(self._fetch, job, send, fetch)
        return await mirror_answer(job, ChannelItems(receive, fetch))

    async def _fetch(
        self, job: MirrorJob, send: trio.MemorySendChannel[MirrorItem], fetch: trio.CancelScope
    ) -> None:
        """One request's fetch, in the task tree; it ends when the response lets it go."""
        async with send:
            with fetch:
                try:
                    await self.forwarder.run(job, send)
                except Exception:  # one request's failure must not end the others'
                    logger.exception(
                        "mirror task failed", extra={"key": job.request.reference.identifier}
                    )


def query_value(query: bytes, name: str) -> str | None:
    """The first value of `name` in a query string (form-decoded, UTF-8), or None."""
    if not query:
        return None
    for part in query.decode("latin-1").split("&"):
        key, _, value = part.partition("=")
        if unquote_plus(key, errors="replace") == name:
            return unquote_plus(value, errors="replace")
    return None


def _body_length(plan: LocalBlob | InflightBlob) -> int:
    return 0 if plan.head_only else plan.length


def create_app(registry: Registry, *, fast: bool = True) -> QuartTrio:
    """The registry app on `registry` (whose `run` must be running to mirror); serve it with
    `registry.serve.server.serve_registry`.

    The app owns every route.  Its ASGI layer answers the registry's own routes (`/v2/...` and
    the probes, `_direct_route`) by calling `Registry.handle` itself, without building Quart's
    request and context (`fast=False`: through Quart's dispatch too; the tests compare both);
    whatever else arrives, and every error a handler raises, is Quart's.
    """
    app = QuartTrio(__name__)
    app.response_class = Response
    app.config["RESPONSE_TIMEOUT"] = None
    # file bodies leave by the server's zero-copy extension when it has one
    app.asgi_http_class = type(  # type: ignore[assignment]
        "Connection", (RegistryConnection,), {"stats": registry.stats}
    )
    trusted = registry.settings.trusted_proxies
    metered = with_request_metrics(app.asgi_app, trusted)
    direct = with_request_metrics(_direct(app, registry), trusted) if fast else None

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await metered(scope, receive, send)
            return
        finishers: list[Callable[[], None]] = []
        scope[FINISHERS] = finishers
        try:
            if direct is not None and _direct_route(scope):
                await direct(scope, receive, send)
            else:
                await metered(scope, receive, send)
        finally:
            for finish in finishers:  # the response is over: sent, cut or abandoned
                finish()

    app.asgi_app = asgi  # type: ignore[method-assign,assignment]

    async def handle(path: str = "") -> Response:
        return await registry.handle(cast(dict[str, Any], request.scope), "/" + path)

    app.add_url_rule("/", "root", handle, methods=ALL_METHODS, provide_automatic_options=False)
    app.add_url_rule(
        "/<path:path>",
        "any",
        handle,
        methods=ALL_METHODS,
        provide_automatic_options=False,
        strict_slashes=False,
    )

    @app.errorhandler(404)
    @app.errorhandler(405)
    async def not_found(_: Exception) -> Response:
        return empty_response(404)

    return app


def _direct_route(scope: dict[str, Any]) -> bool:
    """A request Quart's routing would give, unchanged, to `Registry.handle`: one of the methods
    the rules take, on a path of the registry's own routes (no empty segments, which routing
    may rewrite), without a root path."""
    path: str = scope["path"]
    return (
        scope["method"] in DIRECT_METHODS
        and not scope.get("root_path")
        and (path.startswith("/v2/") or path in DIRECT_PATHS)
        and "//" not in path
    )


def _direct(app: QuartTrio, registry: Registry) -> Callable[..., Awaitable[None]]:
    """The ASGI handler of `_direct_route`'s requests: what `RegistryConnection` does, with
    `Registry.handle` in place of Quart's dispatch; a handler's exception gets Quart's answer."""
    connection_class = app.asgi_http_class

    async def answer(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while True:  # the request's body, unread (a client gone before it ended is not answered)
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            if message["type"] == "http.request" and not message.get("more_body", False):
                break
        connection = cast(RegistryConnection, connection_class(app, cast(Any, scope)))
        with trio.CancelScope() as cancel:
            scope[CLIENT_WATCH] = ClientWatch(cancel, receive)
            try:
                response: Any = await registry.handle(scope, scope["path"])
            except trio.Cancelled:
                raise
            except BaseExceptionGroup as group:  # as Quart: cancellation is the server's
                error, _ = group.split(trio.Cancelled)
                if error is None:
                    raise
                response = await _quart_error(app, connection, send, error)
            except Exception as error:
                response = await _quart_error(app, connection, send, error)
            await connection._send_response(send, response)

    return answer


async def _quart_error(
    app: QuartTrio, connection: RegistryConnection, send: Any, error: BaseException
) -> Any:
    """Quart's answer to a handler's exception (logged, 500), in a request context of its own."""
    request_ = connection._create_request_from_scope(send)
    request_.body.set_complete()
    async with app.request_context(request_):
        return await app.handle_exception(cast(Exception, error))
