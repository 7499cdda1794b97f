"""The registry's face: a Quart-Trio app serving the OCI pull API, /readyz and /livez (spec §3).

Why this shape: the app only maps outcomes of the pure cores (`distribution`, `ranges`, `mirror`)
to HTTP responses; local content comes from a `ContentStore`, everything else goes through a
`Forwarder` task that resolves providers with the `Router`.  Every other method or path is a 404
with an empty body, like Spegel.  Malformed names, tags, digests and `ns` values get a 404 (what
containerd treats as "next host") whose OCI error body says what was wrong; malformed ranges 400,
unsatisfiable ranges 416.  Request metrics and the access log line are
`registry.serve.access_log`'s.
With Basic auth configured (`RegistrySettings.basic_auth`), every request but the probes is checked
first, before any lookup, by `registry.auth.basic.authorized`; the front door's plans
(`plan_local_blob`, `plan_mirror_blob`) make the same check and leave refused requests to the app,
which answers 401 `UNAUTHORIZED`.  A peer's cluster-key credential is accepted instead of the
password, and a manifest answered to it carries the proof the requester needs to use it for a tag
(`registry.auth.peer`); without the key a tag is never resolved through peers (404).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

import trio
from quart import request
from quart_trio import QuartTrio

from registry.auth.basic import BasicAuth
from registry.auth.peer import ANSWER_HEADER, PeerAuth, PeerCredential, admit
from registry.burst.claim_supply import ClaimParticipation
from registry.burst.own_downloads import FED_BY_HEADER
from registry.burst.provider_choice import UploadSlots
from registry.events import MirrorEvents
from registry.http.client import PeerClient
from registry.interfaces import (
    BlobReader,
    ContentNotFound,
    ContentStore,
    Descriptor,
    DownloadDiscarder,
    InflightSource,
    IngestFile,
    KnowsAbsence,
    Router,
)
from registry.metrics import (
    MIRROR_LAST_SUCCESS,
    MIRROR_REQUESTS,
    registry_label,
    set_label_registries,
)
from registry.mirror.forwarder import Forwarder
from registry.mirror.job import (
    MirrorFailure,
    MirrorHead,
    MirrorItem,
    MirrorJob,
    MirrorSettings,
)
from registry.mirror.peer_answer import Quarantine
from registry.oci.distribution import (
    ApiVersionCheck,
    ContentKind,
    ContentRequest,
    ErrorCode,
    PathError,
    parse_request_path,
)
from registry.oci.filters import ReferenceFilter
from registry.oci.mediatypes import OCTET_STREAM, is_manifest_media_type
from registry.oci.ranges import RangeError, RangeNotSatisfiable, RangeSpec, parse_range
from registry.serve.access_log import TrustedProxies, with_request_metrics
from registry.serve.inflight import GrowingFile, InflightUploads, upload_chunks
from registry.serve.responses import LocalBlob, MirrorAborted, MirrorPlan, Response
from registry.serve.responses import blob_response as _blob_response
from registry.serve.responses import blob_response_parts as _blob_response_parts
from registry.serve.responses import empty_response as _empty
from registry.serve.responses import mirror_chunks as _mirror_chunks
from registry.serve.responses import oci_error as _oci_error

__all__ = [
    "LocalBlob",
    "MirrorAborted",
    "MirrorPlan",
    "RegistrySettings",
    "create_app",
    "plan_local_blob",
    "plan_mirror_blob",
]

logger = logging.getLogger(__name__)
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
MIRRORED_HEADER = "X-Spegel-Mirrored"


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


class _Registry:
    def __init__(
        self,
        app: QuartTrio,
        store: ContentStore,
        router: Router,
        settings: RegistrySettings,
        events: MirrorEvents | None,
        claims: ClaimParticipation | None = None,
        uploads: InflightUploads | None = None,
    ) -> None:
        self.app = app
        self.store = store
        self.router = router
        self.settings = settings
        self.filters = settings.filters or ReferenceFilter()
        set_label_registries(self.filters.registries)
        self.readiness = settings.readiness or router.ready
        self.default_registry = settings.default_registry
        mirror = settings.mirror
        if settings.basic_auth is not None:
            mirror = replace(mirror, authorization=settings.basic_auth.header_value)
        if settings.peer_auth is not None:
            mirror = replace(mirror, peer_auth=settings.peer_auth)
        # blobs this node is still downloading (a store that can tell: the containerd-backed one)
        self.inflight = store if isinstance(store, InflightSource) else None
        self.forwarder = Forwarder(
            router,
            PeerClient(read_size=settings.read_size),
            mirror,
            Quarantine(),
            events=events,
            claims=claims,
            discard=store if isinstance(store, DownloadDiscarder) else None,
        )
        self.uploads = UploadSlots(settings.peer_upload_limit)
        # this registry's uploads of blobs still downloading here (rows of the debug page)
        self.inflight_uploads = uploads if uploads is not None else InflightUploads()

    async def dispatch(self, path: str) -> Response:
        return await self._dispatch(path, request.method)

    def still_written(self, digest: str) -> Callable[[], bool] | None:
        """A check that this node's download of `digest` is still in progress (its writer alive:
        the store's in-flight table drops a download nobody writes); None without such a table."""
        inflight = self.inflight
        if inflight is None:
            return None
        return lambda: inflight.find_inflight(digest) is not None

    def admit(
        self, header: str | None, method: str, path: str, ns: str | None, *, consume: bool = False
    ) -> tuple[bool, PeerCredential | None]:
        """The one authentication check, made before anything is looked up (both paths): Basic
        credentials or a peer's cluster-key credential (`registry.auth.peer.admit`)."""
        basic, auth = self.settings.basic_auth, self.settings.peer_auth
        return admit(basic, auth, header, method, path, ns, time.time(), consume=consume)

    def authorized(
        self, header: str | None, method: str = "GET", path: str = "", ns: str | None = None
    ) -> bool:
        return self.admit(header, method, path, ns)[0]

    async def _dispatch(self, path: str, method: str) -> Response:
        probe = path in ("/livez", "/readyz") and method in ("GET", "HEAD")
        ok, credential = True, None
        if not probe:  # a peer credential is spent here: this handler answers the request
            ns_arg = request.args.get("ns")
            header = request.headers.get("Authorization")
            ok, credential = self.admit(header, method, path, ns_arg, consume=True)
        if not ok:
            return _oci_error(401, ErrorCode.UNAUTHORIZED, "invalid credentials")
        if method not in ("GET", "HEAD"):
            return _empty(404)
        if path == "/livez":
            return _empty(200)
        if path == "/readyz":
            try:
                ready = self.readiness()
            except Exception as exc:
                logger.warning("readiness check failed", extra={"error": str(exc)})
                ready = False
            return _empty(200 if ready else 500)
        if path != "/v2" and not path.startswith("/v2/"):
            return _empty(404)
        try:
            parsed = parse_request_path(path, request.args.get("ns") or self.default_registry)
        except PathError as exc:
            return _oci_error(404, exc.code, exc.message)
        if isinstance(parsed, ApiVersionCheck):
            return _empty(200)
        if self.filters.is_filtered(parsed.reference):
            return _empty(404)
        range_spec: RangeSpec | None = None
        range_header = request.headers.get("Range")
        if parsed.kind is ContentKind.BLOB and range_header is not None:
            try:
                range_spec = parse_range(range_header)
            except RangeError as exc:
                return _oci_error(400, ErrorCode.RANGE_INVALID, str(exc))
        mirrored = request.headers.get(MIRRORED_HEADER, "").strip().lower() == "true"
        descriptor = await self._local(parsed, peer=mirrored)
        if descriptor is None and mirrored and (ingest := self._find_inflight(parsed)) is not None:
            return self._serve_inflight(parsed, ingest, method, range_spec)
        if descriptor is None:
            if mirrored:
                return _oci_error(404, parsed.unknown_code, f"{parsed.reference} not found")
            if parsed.reference.digest is None and self.settings.peer_auth is None:
                # no cluster key: no peer can prove what a tag means, so peers are not asked
                return _oci_error(
                    404,
                    parsed.unknown_code,
                    f"{parsed.reference}: tags are not resolved through peers without the "
                    "cluster key",
                )
            cast(dict[str, Any], request.scope)["spegla.mirrored"] = True  # access log: "mirror"
            client_ip = request.remote_addr or None
            accept = request.headers.get("Accept")
            return await self._mirror(MirrorJob(parsed, method, range_spec, client_ip, accept))
        if parsed.kind is ContentKind.MANIFEST:
            response = await self._serve_manifest(parsed, descriptor, method)
            if credential is not None and self.settings.peer_auth is not None:
                # the requester uses a tag's digest only with this proof (registry.auth.peer)
                response.headers[ANSWER_HEADER] = self.settings.peer_auth.answer_proof(
                    credential.nonce, descriptor.digest, str(parsed.reference)
                )
            return response
        return await self._serve_blob(parsed, descriptor, method, range_spec)

    async def _local(self, parsed: ContentRequest, peer: bool = False) -> Descriptor | None:
        """What the store holds for `parsed`, or None.  This node's own requests (not a
        `peer`'s) skip the store's round trip when its files say the digest is not there
        (`KnowsAbsence`): a miss or a mirrored GET then costs no Content.Info calls."""
        ref = parsed.reference
        if not peer and ref.digest and isinstance(self.store, KnowsAbsence):
            if self.store.surely_absent(ref.digest):
                return None
        try:
            digest = ref.digest or await self.store.resolve_tag(f"{ref.name}:{ref.tag}")
            return await self.store.describe(digest)
        except ContentNotFound:
            return None
        except Exception as exc:
            logger.warning(
                "local store lookup failed", extra={"key": ref.identifier, "error": str(exc)}
            )
            return None

    def _find_inflight(self, parsed: ContentRequest) -> IngestFile | None:
        """A download of the requested blob in progress here.  Only peers (mirrored requests) are
        served from it: this node's own containerd creates the download before it asks us for the
        bytes, so serving it its own download would wait on itself."""
        digest = parsed.reference.digest
        if self.inflight is None or parsed.kind is not ContentKind.BLOB or digest is None:
            return None
        try:
            return self.inflight.find_inflight(digest)
        except Exception as exc:
            logger.warning("in-flight lookup failed", extra={"key": digest, "error": str(exc)})
            return None

    def _serve_inflight(
        self,
        parsed: ContentRequest,
        ingest: IngestFile,
        method: str,
        range_spec: RangeSpec | None,
    ) -> Response:
        """A blob still downloading: full size announced, bytes as they land
        (registry.serve.inflight)."""

        def growing_body(start: int, length: int) -> AsyncIterator[bytes] | Response:
            growing = GrowingFile(ingest, written=self.still_written(ingest.digest))
            try:
                growing.open()
            except OSError:
                return _oci_error(404, ErrorCode.BLOB_UNKNOWN, f"{ingest.digest} not found")
            ip = request.remote_addr or ""
            return upload_chunks(growing, start, length, ip, self.inflight_uploads)

        descriptor = Descriptor(ingest.digest, ingest.size, OCTET_STREAM)
        registry = parsed.reference.registry
        return _blob_response(descriptor, registry, method, range_spec, growing_body)

    async def _serve_manifest(
        self, parsed: ContentRequest, descriptor: Descriptor, method: str
    ) -> Response:
        if not is_manifest_media_type(descriptor.media_type):
            return _oci_error(
                404, ErrorCode.MANIFEST_UNKNOWN, f"{descriptor.digest} is not a manifest"
            )
        headers = {
            "Content-Type": descriptor.media_type,
            "Docker-Content-Digest": descriptor.digest,
            "OCI-Namespace": parsed.reference.registry,
        }
        body: bytes | None = b""
        if method == "GET":
            try:
                body = await self._read_all(descriptor)
            except ContentNotFound:
                body = None
            if body is None or len(body) != descriptor.size:
                return _oci_error(
                    404, ErrorCode.MANIFEST_UNKNOWN, f"{descriptor.digest} changed or disappeared"
                )
        response = Response(body, status=200, headers=headers)
        response.headers["Content-Length"] = str(descriptor.size)
        return response

    async def _read_all(self, descriptor: Descriptor) -> bytes:
        async with self.store.open(descriptor.digest) as reader:
            parts = [chunk async for chunk in reader.read(0, reader.size)]
        return b"".join(parts)

    async def _serve_blob(
        self,
        parsed: ContentRequest,
        descriptor: Descriptor,
        method: str,
        range_spec: RangeSpec | None,
    ) -> Response:
        if is_manifest_media_type(descriptor.media_type):
            return _oci_error(404, ErrorCode.BLOB_UNKNOWN, f"{descriptor.digest} is a manifest")

        def stored_body(start: int, length: int) -> AsyncIterator[bytes]:
            return self._local_chunks(descriptor.digest, start, length)

        registry = parsed.reference.registry
        return _blob_response(descriptor, registry, method, range_spec, stored_body)

    async def plan_local_blob(
        self,
        method: str,
        path: str,
        ns: str | None,
        range_header: str | None,
        authorization: str | None = None,
        mirrored: bool = False,
    ) -> LocalBlob | None:
        """The response to a GET/HEAD of a local blob; None for anything else (including a
        request without valid credentials: the app answers it, with a 401).  A peer's request
        (`mirrored`) may also get a blob still downloading here."""
        if not self.authorized(authorization, method, path, ns):
            return None
        try:
            parsed = parse_request_path(path, ns or self.default_registry)
            range_spec = None if range_header is None else parse_range(range_header)
        except (PathError, RangeError):
            return None
        if not isinstance(parsed, ContentRequest) or parsed.kind is not ContentKind.BLOB:
            return None
        if method not in ("GET", "HEAD") or self.filters.is_filtered(parsed.reference):
            return None
        descriptor = await self._local(parsed, peer=mirrored)
        ingest = self._find_inflight(parsed) if descriptor is None and mirrored else None
        if ingest is not None:
            descriptor = Descriptor(ingest.digest, ingest.size, OCTET_STREAM)
        if descriptor is None or is_manifest_media_type(descriptor.media_type):
            return None
        try:
            status, headers, start, length = _blob_response_parts(
                descriptor, parsed.reference.registry, range_spec
            )
        except RangeNotSatisfiable:
            return None
        # whether a file backs it is checked once, when the fast path opens it (`LocalBlob.open`)
        headers = {name.lower(): value for name, value in headers.items()}
        if ingest is not None and (fed_by := self.forwarder.own.fed_by(ingest.digest)):
            headers[FED_BY_HEADER.lower()] = ",".join(fed_by)  # see registry.burst.own_downloads
        # A peer credential is not spent here: the door may still hand the request to the app
        # (no file backs the blob), which checks it again.  So a blob GET's credential can be
        # replayed within its window for the same blob, whose bytes its digest fixes.
        return LocalBlob(status, headers, start, length, self.store, descriptor, ingest)

    async def plan_mirror_blob(
        self,
        method: str,
        path: str,
        ns: str | None,
        headers: dict[str, str],
        client_ip: str | None = None,
    ) -> MirrorPlan | None:
        """The mirror job a GET of a blob that is not held here becomes; None for anything else
        (the app answers those, a request without valid credentials with a 401).  `headers`
        have lower-case names."""
        authorization = headers.get("authorization")
        if not self.authorized(authorization, method, path, ns):
            return None
        if method != "GET" or headers.get(MIRRORED_HEADER.lower(), "").strip().lower() == "true":
            return None
        try:
            parsed = parse_request_path(path, ns or self.default_registry)
            range_header = headers.get("range")
            range_spec = None if range_header is None else parse_range(range_header)
        except (PathError, RangeError):
            return None
        if not isinstance(parsed, ContentRequest) or parsed.kind is not ContentKind.BLOB:
            return None
        if self.filters.is_filtered(parsed.reference) or await self._local(parsed) is not None:
            return None
        if not self.admit(authorization, method, path, ns, consume=True)[0]:
            return None
        job = MirrorJob(parsed, method, range_spec, client_ip, headers.get("accept"))
        return MirrorPlan(job, self.forwarder, self.app)

    def open_mirror(
        self, job: MirrorJob, nursery: trio.Nursery
    ) -> trio.MemoryReceiveChannel[MirrorItem]:
        send, receive = trio.open_memory_channel[MirrorItem](self.settings.channel_depth)
        nursery.start_soon(self.forwarder.run, job, send)
        return receive

    async def _local_chunks(self, digest: str, start: int, length: int) -> AsyncIterator[bytes]:
        async with self.store.open(digest) as reader:
            reader_checked: BlobReader = reader
            async for chunk in reader_checked.read(start, length):
                yield chunk

    async def _mirror(self, job: MirrorJob) -> Response:
        registry = registry_label(job.request.reference.registry)
        receive = self.open_mirror(job, self.app.nursery)
        try:
            first = await receive.receive()
        except trio.EndOfChannel:
            first = MirrorFailure(500, job.request.unknown_code, "mirror ended without answer", 0)
        except BaseException:
            receive.close()
            raise
        if isinstance(first, MirrorHead):
            MIRROR_REQUESTS.labels(registry, "inflight" if first.inflight else "hit").inc()
            MIRROR_LAST_SUCCESS.set(time.time())
            headers = dict(first.headers)
            if job.method == "HEAD":
                receive.close()
                response = Response(b"", status=first.status, headers=headers)
            else:
                response = Response(_mirror_chunks(receive), status=first.status, headers=headers)
            response.headers["Content-Length"] = headers["Content-Length"]
            return response
        receive.close()
        MIRROR_REQUESTS.labels(registry, "miss").inc()
        if isinstance(first, MirrorFailure):
            return _oci_error(
                first.status,
                first.code,
                first.message,
                {"attempts": first.attempts},
                dict(first.headers),
            )
        return _oci_error(500, job.request.unknown_code, "mirror failed")


async def plan_mirror_blob(
    app: QuartTrio,
    *,
    method: str,
    path: str,
    ns: str | None,
    headers: dict[str, str],
    client_ip: str | None = None,
) -> MirrorPlan | None:
    """The mirror job for a blob GET `app` does not hold locally, else None."""
    registry: _Registry = app.extensions["spegla.registry"]
    return await registry.plan_mirror_blob(method, path, ns, headers, client_ip)


def mirror_events(app: QuartTrio) -> MirrorEvents | None:
    """The events hub `create_app` was given (None without one, or for another app)."""
    registry = app.extensions.get("spegla.registry")
    return registry.forwarder.events if isinstance(registry, _Registry) else None


async def plan_local_blob(
    app: QuartTrio,
    *,
    method: str,
    path: str,
    ns: str | None,
    range_header: str | None,
    authorization: str | None = None,
    mirrored: bool = False,
) -> LocalBlob | None:
    """What `app` would answer to this request if it is a local file-backed blob, else None.

    `authorization` is the request's Authorization header: checked first, before any lookup;
    `mirrored`: the request came from a peer (X-Spegel-Mirrored), which may be given a blob still
    downloading here."""
    registry: _Registry = app.extensions["spegla.registry"]
    return await registry.plan_local_blob(method, path, ns, range_header, authorization, mirrored)


def create_app(
    store: ContentStore,
    router: Router,
    settings: RegistrySettings | None = None,
    *,
    events: MirrorEvents | None = None,
    claims: ClaimParticipation | None = None,
    uploads: InflightUploads | None = None,
) -> QuartTrio:
    """The registry app; serve it with `registry.serve.server.serve_registry`.

    `events` receives the mirror path's events (`registry.events`), e.g. for a debug page.
    `claims`: take part in bursts' claims (`registry.burst.claim`; None: plain resolve).
    `uploads`: where its uploads of blobs still downloading are counted (None: its own).
    """
    app = QuartTrio(__name__)
    app.response_class = Response
    app.config["RESPONSE_TIMEOUT"] = None
    registry = _Registry(
        app, store, router, settings or RegistrySettings(), events, claims, uploads
    )
    app.extensions["spegla.registry"] = registry
    app.asgi_app = with_request_metrics(  # type: ignore[method-assign]
        app.asgi_app, registry.settings.trusted_proxies
    )

    async def handle(path: str = "") -> Response:
        return await registry.dispatch("/" + path)

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
        return _empty(404)

    @app.before_serving
    async def claim_holds() -> None:
        if claims is not None and claims.background is None:
            claims.background = app.nursery  # a claimant's claim outlives its request
        if registry.forwarder.background is None:
            # a shared fetch outlives its first GET
            registry.forwarder.background = app.nursery

    @app.after_serving
    async def close_client() -> None:
        await registry.forwarder.client.aclose()

    return app
