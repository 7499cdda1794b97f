"""OCI distribution pull API: request paths, the `ns` parameter, and error bodies.

Why pure: every byte of a request's meaning is decided here, without I/O, so the app only maps the
outcome to responses.  Parse failures are `PathError`s carrying an OCI error code and a message; the
app answers them with 404 (what containerd treats as "try the next host") and a JSON body saying
what was wrong, instead of Spegel's empty body.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

from registry.oci.reference import (
    Reference,
    ReferenceError,
    parse_digest,
    validate_registry,
    validate_repository,
    validate_tag,
)

__all__ = [
    "ApiVersionCheck",
    "ContentKind",
    "ContentRequest",
    "ErrorCode",
    "PathError",
    "error_body",
    "parse_request_path",
]


class ErrorCode(enum.StrEnum):
    """OCI distribution error codes used by this registry."""

    MANIFEST_UNKNOWN = "MANIFEST_UNKNOWN"
    BLOB_UNKNOWN = "BLOB_UNKNOWN"
    NAME_INVALID = "NAME_INVALID"
    TAG_INVALID = "TAG_INVALID"
    DIGEST_INVALID = "DIGEST_INVALID"
    NAME_UNKNOWN = "NAME_UNKNOWN"
    RANGE_INVALID = "RANGE_INVALID"
    DENIED = "DENIED"
    UNAUTHORIZED = "UNAUTHORIZED"
    UNSUPPORTED = "UNSUPPORTED"
    TOOMANYREQUESTS = "TOOMANYREQUESTS"


def error_body(code: ErrorCode, message: str, detail: object = None) -> bytes:
    """`{"errors":[{"code":…,"message":…,"detail":…}]}` as compact JSON bytes."""
    entry: dict[str, object] = {"code": str(code), "message": message}
    if detail is not None:
        entry["detail"] = detail
    return json.dumps({"errors": [entry]}, separators=(",", ":")).encode()


class PathError(ValueError):
    """A /v2/ request that does not name a manifest or blob this registry could serve."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ContentKind(enum.Enum):
    MANIFEST = "manifest"
    BLOB = "blob"


@dataclass(frozen=True, slots=True)
class ApiVersionCheck:
    """`/v2/`: answered 200 with an empty body."""


@dataclass(frozen=True, slots=True)
class ContentRequest:
    """A manifest (by tag or digest) or a blob (by digest) of a repository in registry `ns`."""

    kind: ContentKind
    reference: Reference

    @property
    def path(self) -> str:
        """The canonical request path (what is forwarded to peers)."""
        ref = self.reference
        target = ref.digest if ref.digest is not None else ref.tag
        section = "manifests" if self.kind is ContentKind.MANIFEST else "blobs"
        return f"/v2/{ref.repository}/{section}/{target}"

    @property
    def unknown_code(self) -> ErrorCode:
        if self.kind is ContentKind.MANIFEST:
            return ErrorCode.MANIFEST_UNKNOWN
        return ErrorCode.BLOB_UNKNOWN


def parse_request_path(path: str, ns: str | None) -> ApiVersionCheck | ContentRequest:
    """Map a request path (without query) and the `ns` query value to what is asked for."""
    if path in ("/v2", "/v2/"):
        return ApiVersionCheck()
    if not path.startswith("/v2/"):
        raise PathError(ErrorCode.UNSUPPORTED, "not an OCI distribution path")
    rest = path[len("/v2/") :]
    repository, sep, target = rest.rpartition("/manifests/")
    kind = ContentKind.MANIFEST
    if not sep:
        repository, sep, target = rest.rpartition("/blobs/")
        kind = ContentKind.BLOB
        if not sep:
            raise PathError(ErrorCode.UNSUPPORTED, "only manifests and blobs can be fetched")
    try:
        validate_repository(repository)
    except ReferenceError as exc:
        raise PathError(ErrorCode.NAME_INVALID, str(exc)) from None
    tag: str | None = None
    digest: str | None = None
    if kind is ContentKind.MANIFEST and ":" not in target:
        try:
            tag = validate_tag(target)
        except ReferenceError as exc:
            raise PathError(ErrorCode.TAG_INVALID, str(exc)) from None
    else:
        try:
            digest = parse_digest(target)
        except ReferenceError as exc:
            raise PathError(ErrorCode.DIGEST_INVALID, str(exc)) from None
    if ns is None or ns == "":
        if tag is not None:
            message = "registry parameter ns needs to be set for tag references"
        else:
            message = "registry parameter ns needs to be set"
        raise PathError(ErrorCode.NAME_UNKNOWN, message)
    try:
        validate_registry(ns)
    except ReferenceError as exc:
        raise PathError(ErrorCode.NAME_INVALID, f"invalid ns parameter: {exc}") from None
    return ContentRequest(kind, Reference(ns, repository, tag, digest))
