"""One request, classified once: the facts of a request become a typed plan (or a lookup to make).

Why: every route's decisions (authentication, method, path, filters, range, local or in-flight or
from peers) are made here and nowhere else, so both servers and every body path answer the same
request the same way.  `classify` is pure over the request's facts and the registry's rules; what
it cannot decide without the store it returns as a `Wanted`, which `look_up` answers with ONE
store lookup (containerd is asked once per request) and `decide` (pure again) turns into the
final plan.  Invariants:
- authentication comes first: a request without valid credentials is `Unauthorized` before any
  path is parsed, any admission is made or anything is looked up (a 401 tells nothing about what
  this node holds or downloads);
- only a peer's request (`X-Spegel-Mirrored: true`) may be answered from a download still in
  progress here, and a peer's request is never mirrored on (no loops between nodes);
- without the cluster key a tag is never resolved through peers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from registry.auth.basic import BasicAuth
from registry.auth.peer import PeerAuth, PeerCredential, admit
from registry.interfaces import (
    ContentNotFound,
    ContentStore,
    Descriptor,
    InflightSource,
    IngestFile,
    KnowsAbsence,
)
from registry.mirror.job import MirrorJob
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
from registry.serve.responses import blob_response_parts

__all__ = [
    "Empty",
    "Found",
    "InflightBlob",
    "LocalBlob",
    "LocalManifest",
    "Mirror",
    "OciError",
    "Plan",
    "Readiness",
    "RequestFacts",
    "Rules",
    "StoreFaces",
    "Unauthorized",
    "Wanted",
    "classify",
    "decide",
    "look_up",
]

logger = logging.getLogger(__name__)
MIRRORED_HEADER = "X-Spegel-Mirrored"


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What a request says, read once from its head."""

    method: str
    path: str  # decoded, without the query
    ns: str | None  # the first `ns` query value (the registry mirrored), if any
    authorization: str | None = None
    range_header: str | None = None
    mirrored: bool = False  # X-Spegel-Mirrored: true (a peer asks)
    client_ip: str = ""  # the requester (X-Forwarded-For only from trusted proxies)
    remote: str = ""  # the connection's remote address
    accept: str | None = None


@dataclass(frozen=True, slots=True)
class Rules:
    """The registry's settings classification depends on."""

    filters: ReferenceFilter = field(default_factory=ReferenceFilter)
    default_registry: str | None = None
    basic_auth: BasicAuth | None = None
    peer_auth: PeerAuth | None = None


# --- plans: what to answer --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Empty:
    """An empty-bodied answer (no Content-Type), as Spegel gives for probes and unknown routes."""

    status: int


@dataclass(frozen=True, slots=True)
class Readiness:
    """GET/HEAD /readyz: 200 when the router is ready, else 500."""


@dataclass(frozen=True, slots=True)
class OciError:
    """An OCI error body (JSON) with `status`."""

    status: int
    code: ErrorCode
    message: str
    headers: tuple[tuple[str, str], ...] = ()
    detail: object = None


@dataclass(frozen=True, slots=True)
class Unauthorized:
    """No valid credentials: 401 `UNAUTHORIZED`, before anything else was decided."""


@dataclass(frozen=True, slots=True)
class LocalBlob:
    """A blob held here: `length` bytes from `offset` (all of it, or the range asked for)."""

    descriptor: Descriptor
    status: int  # 200, or 206 for a range
    headers: tuple[tuple[str, str], ...]  # Content-Length included
    offset: int
    length: int
    head_only: bool


@dataclass(frozen=True, slots=True)
class InflightBlob:
    """A blob this node is still downloading, served to a peer as its bytes land."""

    ingest: IngestFile
    status: int
    headers: tuple[tuple[str, str], ...]
    offset: int
    length: int
    head_only: bool


@dataclass(frozen=True, slots=True)
class LocalManifest:
    """A manifest held here; `credential`: the peer credential a proof of the tag answers."""

    descriptor: Descriptor
    registry: str
    reference: str
    head_only: bool
    credential: PeerCredential | None = None


@dataclass(frozen=True, slots=True)
class Mirror:
    """Not held here: answered from peers by the forwarder."""

    job: MirrorJob


Plan = (
    Empty | Readiness | OciError | Unauthorized | LocalBlob | InflightBlob | LocalManifest | Mirror
)


@dataclass(frozen=True, slots=True)
class Wanted:
    """A request that passed every check that needs no store: the store decides the rest."""

    request: ContentRequest
    range_spec: RangeSpec | None
    credential: PeerCredential | None
    facts: RequestFacts

    @property
    def upload(self) -> str | None:
        """The digest a peer GETs from us (subject to peer admission), else None."""
        ref = self.request.reference
        if self.facts.method != "GET" or not self.facts.mirrored:
            return None
        return ref.digest if self.request.kind is ContentKind.BLOB and ref.digest else None


def classify(facts: RequestFacts, rules: Rules, now: float | None = None) -> Plan | Wanted:
    """The plan for `facts`, or what must be looked up to know it.  A peer credential is spent
    here (its nonce consumed): this is the one place a request is authenticated."""
    method, path = facts.method, facts.path
    probe = path in ("/livez", "/readyz") and method in ("GET", "HEAD")
    credential = None
    if not probe:
        ok, credential = admit(
            rules.basic_auth,
            rules.peer_auth,
            facts.authorization,
            method,
            path,
            facts.ns,
            time.time() if now is None else now,
            consume=True,
        )
        if not ok:
            return Unauthorized()
    if method not in ("GET", "HEAD"):
        return Empty(404)
    if path == "/livez":
        return Empty(200)
    if path == "/readyz":
        return Readiness()
    if path != "/v2" and not path.startswith("/v2/"):
        return Empty(404)
    try:
        parsed = parse_request_path(path, facts.ns or rules.default_registry)
    except PathError as exc:
        return OciError(404, exc.code, exc.message)
    if isinstance(parsed, ApiVersionCheck):
        return Empty(200)
    if rules.filters.is_filtered(parsed.reference):
        return Empty(404)
    range_spec = None
    if parsed.kind is ContentKind.BLOB and facts.range_header is not None:
        try:
            range_spec = parse_range(facts.range_header)
        except RangeError as exc:
            return OciError(400, ErrorCode.RANGE_INVALID, str(exc))
    return Wanted(parsed, range_spec, credential, facts)


# --- the one lookup -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Found:
    """What the store holds for a `Wanted` request: complete content, a download, or nothing."""

    descriptor: Descriptor | None = None
    ingest: IngestFile | None = None


@dataclass(frozen=True, slots=True)
class StoreFaces:
    """The optional faces of a store (checked once: a Protocol isinstance check is slow)."""

    absence: KnowsAbsence | None = None
    inflight: InflightSource | None = None

    @classmethod
    def of(cls, store: ContentStore) -> StoreFaces:
        return cls(
            store if isinstance(store, KnowsAbsence) else None,
            store if isinstance(store, InflightSource) else None,
        )


async def look_up(wanted: Wanted, store: ContentStore, faces: StoreFaces | None = None) -> Found:
    """The store's answer for `wanted` (one lookup: a tag's resolution and the description of
    its digest, or the digest's description, then a peer may be given a download in progress).

    This node's own requests skip the store's round trip when its files say the digest is not
    there (`KnowsAbsence`); a peer's request always asks, since the agent may see the files
    differently from containerd and a peer must not be refused what this node holds."""
    ref = wanted.request.reference
    peer = wanted.facts.mirrored
    faces = faces if faces is not None else StoreFaces.of(store)
    absence = faces.absence
    descriptor = None
    if peer or not ref.digest or not (absence is not None and absence.surely_absent(ref.digest)):
        try:
            digest = ref.digest or await store.resolve_tag(f"{ref.name}:{ref.tag}")
            descriptor = await store.describe(digest)
        except ContentNotFound:
            descriptor = None
        except Exception as exc:
            logger.warning(
                "local store lookup failed", extra={"key": ref.identifier, "error": str(exc)}
            )
            descriptor = None
    if descriptor is not None:
        return Found(descriptor)
    if peer and wanted.request.kind is ContentKind.BLOB and ref.digest is not None:
        if faces.inflight is not None:
            try:
                return Found(ingest=faces.inflight.find_inflight(ref.digest))
            except Exception as exc:
                logger.warning(
                    "in-flight lookup failed", extra={"key": ref.digest, "error": str(exc)}
                )
    return Found()


def decide(wanted: Wanted, found: Found, rules: Rules) -> Plan:
    """The final plan once the store answered (pure)."""
    request, facts = wanted.request, wanted.facts
    head_only = facts.method == "HEAD"
    registry = request.reference.registry
    descriptor = found.descriptor
    if descriptor is None and found.ingest is not None:
        ingest = found.ingest
        selected = _blob_selection(
            Descriptor(ingest.digest, ingest.size, OCTET_STREAM), registry, wanted.range_spec
        )
        if isinstance(selected, OciError):
            return selected
        status, headers, offset, length = selected
        return InflightBlob(ingest, status, headers, offset, length, head_only)
    if descriptor is None:
        if facts.mirrored:
            return OciError(404, request.unknown_code, f"{request.reference} not found")
        if request.reference.digest is None and rules.peer_auth is None:
            return OciError(
                404,
                request.unknown_code,
                f"{request.reference}: tags are not resolved through peers without the cluster key",
            )
        job = MirrorJob(
            request, facts.method, wanted.range_spec, facts.client_ip or None, facts.accept
        )
        return Mirror(job)
    if request.kind is ContentKind.MANIFEST:
        if not is_manifest_media_type(descriptor.media_type):
            return OciError(
                404, ErrorCode.MANIFEST_UNKNOWN, f"{descriptor.digest} is not a manifest"
            )
        return LocalManifest(
            descriptor, registry, str(request.reference), head_only, wanted.credential
        )
    if is_manifest_media_type(descriptor.media_type):
        return OciError(404, ErrorCode.BLOB_UNKNOWN, f"{descriptor.digest} is a manifest")
    selected = _blob_selection(descriptor, registry, wanted.range_spec)
    if isinstance(selected, OciError):
        return selected
    status, headers, offset, length = selected
    return LocalBlob(descriptor, status, headers, offset, length, head_only)


def _blob_selection(
    descriptor: Descriptor, registry: str, range_spec: RangeSpec | None
) -> tuple[int, tuple[tuple[str, str], ...], int, int] | OciError:
    """Status, headers, first byte and length of a blob answer; 416 for a range outside it."""
    try:
        status, headers, start, length = blob_response_parts(descriptor, registry, range_spec)
    except RangeNotSatisfiable:
        return OciError(
            416,
            ErrorCode.RANGE_INVALID,
            f"range not satisfiable for {descriptor.size} bytes",
            headers=(("Content-Range", f"bytes */{descriptor.size}"),),
        )
    return status, tuple(headers.items()), start, length
