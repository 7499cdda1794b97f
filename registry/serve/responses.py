"""The registry's HTTP answer shapes: empty bodies without a Content-Type, OCI error JSON, and
the status, headers and byte selection of a blob answer (full or one range).

Why its own module: the pure classifier (`registry.serve.classify`) and the answers
(`registry.serve.answers`) both need these shapes, and neither may depend on the other's
machinery.
"""

from __future__ import annotations

from quart_trio.wrappers import TrioResponse

from registry.interfaces import Descriptor
from registry.oci.distribution import ErrorCode, error_body
from registry.oci.mediatypes import OCTET_STREAM
from registry.oci.ranges import RangeSpec

__all__ = [
    "BodyCut",
    "Response",
    "blob_response_parts",
    "empty_response",
    "oci_error",
]


class Response(TrioResponse):
    """Responses carry no Content-Type unless one is set (Spegel's empty-bodied answers)."""

    default_mimetype = None  # type: ignore[assignment]


class BodyCut(Exception):
    """Raised inside a response body to cut it short (peer content failed, a download in
    progress stopped): the server closes the connection, the client sees a short body and
    resumes elsewhere.  Whoever raises it has logged why."""


def empty_response(status: int, headers: dict[str, str] | None = None) -> Response:
    response = Response(b"", status=status, headers=headers or {})
    response.headers["Content-Length"] = "0"
    return response


def oci_error(
    status: int,
    code: ErrorCode,
    message: str,
    detail: object = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = error_body(code, message, detail)
    response = Response(body, status=status, headers=headers or {})
    response.headers["Content-Type"] = "application/json"
    response.headers["Content-Length"] = str(len(body))
    return response


def blob_response_parts(
    descriptor: Descriptor, registry: str, range_spec: RangeSpec | None
) -> tuple[int, dict[str, str], int, int]:
    """Status, headers, first byte and length of a local blob response (RangeNotSatisfiable)."""
    headers = {
        "Docker-Content-Digest": descriptor.digest,
        "OCI-Namespace": registry,
        "Accept-Ranges": "bytes",
    }
    if range_spec is None:
        headers["Content-Type"] = descriptor.media_type
        headers["Content-Length"] = str(descriptor.size)
        return 200, headers, 0, descriptor.size
    selected = range_spec.resolve(descriptor.size)
    headers["Content-Type"] = OCTET_STREAM
    headers["Content-Range"] = selected.content_range
    headers["Content-Length"] = str(selected.length)
    return 206, headers, selected.start, selected.length
