"""Plans become responses: status, headers and the body each plan is answered with.

Why its own module: `registry.serve.classify` decides; this only shapes.  Headers, status codes
and error bodies are Spegel's: blob answers carry
`Docker-Content-Digest`, `OCI-Namespace`, `Accept-Ranges` and an exact Content-Length; a manifest
answer its media type; a mirrored answer the head the forwarder chose.  Invariant: a mirror
response either starts (a `MirrorHead` came first) with the one consumer of its items as its body
(`registry.serve.bodies.MirrorBody`), or is an OCI error and its items' source is already closed.
"""

from __future__ import annotations

import time

import trio

from registry.auth.peer import ANSWER_HEADER
from registry.metrics import MIRROR_LAST_SUCCESS, MIRROR_REQUESTS, registry_label
from registry.mirror.job import ItemSource, MirrorFailure, MirrorHead, MirrorItem, MirrorJob
from registry.oci.distribution import ErrorCode
from registry.serve.bodies import FileBody, MirrorBody
from registry.serve.classify import Empty, LocalManifest, OciError, Unauthorized
from registry.serve.responses import Response, empty_response, oci_error

__all__ = ["blob_answer", "manifest_answer", "mirror_answer", "simple_answer"]


def simple_answer(plan: Empty | OciError | Unauthorized) -> Response:
    """The answers that need nothing but the plan."""
    if isinstance(plan, Empty):
        return empty_response(plan.status)
    if isinstance(plan, Unauthorized):
        return oci_error(401, ErrorCode.UNAUTHORIZED, "invalid credentials")
    return oci_error(plan.status, plan.code, plan.message, plan.detail, dict(plan.headers))


def blob_answer(status: int, headers: tuple[tuple[str, str], ...], body: FileBody) -> Response:
    """A blob answer whose bytes `body` holds (opened, and sent, by the connection)."""
    response = Response(body, status=status, headers=dict(headers))
    response.headers["Content-Length"] = dict(headers)["Content-Length"]
    return response


def manifest_answer(plan: LocalManifest, body: bytes | None, proof: str | None) -> Response:
    """A manifest's answer; `body` None or of the wrong size: it changed or disappeared."""
    descriptor = plan.descriptor
    if not plan.head_only and (body is None or len(body) != descriptor.size):
        return oci_error(
            404, ErrorCode.MANIFEST_UNKNOWN, f"{descriptor.digest} changed or disappeared"
        )
    headers = {
        "Content-Type": descriptor.media_type,
        "Docker-Content-Digest": descriptor.digest,
        "OCI-Namespace": plan.registry,
    }
    response = Response(b"" if plan.head_only else body, status=200, headers=headers)
    response.headers["Content-Length"] = str(descriptor.size)
    if proof is not None:
        # the requester uses a tag's digest only with this proof (registry.auth.peer)
        response.headers[ANSWER_HEADER] = proof
    return response


async def mirror_answer(job: MirrorJob, source: ItemSource) -> Response:
    """The answer of a mirror job whose items come from `source`.  Waits for the first item: a
    head starts the body, anything else is a miss (and `source` is closed)."""
    body = MirrorBody(source)
    registry = registry_label(job.request.reference.registry)
    try:
        first: MirrorItem | None = await source.receive()
    except trio.EndOfChannel:
        first = None
    except BaseException:
        body.close()
        raise
    if isinstance(first, MirrorHead):
        MIRROR_REQUESTS.labels(registry, "inflight" if first.inflight else "hit").inc()
        MIRROR_LAST_SUCCESS.set(time.time())
        headers = dict(first.headers)
        if job.method == "HEAD":
            body.close()
            response = Response(b"", status=first.status, headers=headers)
        else:
            response = Response(body, status=first.status, headers=headers)
        response.headers["Content-Length"] = headers["Content-Length"]
        return response
    body.close()
    MIRROR_REQUESTS.labels(registry, "miss").inc()
    if first is None:
        first = MirrorFailure(500, job.request.unknown_code, "mirror ended without answer", 0)
    if isinstance(first, MirrorFailure):
        return oci_error(
            first.status,
            first.code,
            first.message,
            {"attempts": first.attempts},
            dict(first.headers),
        )
    return oci_error(500, job.request.unknown_code, "mirror failed")
