"""Every status/header/body case of local serving, each for GET and HEAD, over real sockets.

The app runs under Hypercorn on loopback with an in-memory store and a router whose network knows
no providers (so mirror misses converge at once).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from registry.oci.filters import ReferenceFilter
from registry.oci.mediatypes import OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, OCTET_STREAM
from registry.serve.app import RegistrySettings
from tests.fakes import MemoryContentStore
from tests.registry.conftest import Content, StartNode, fill

UNKNOWN = "sha256:" + "0" * 64
LAYER_SIZE = 256 * 4096 + 4


@dataclass(frozen=True)
class Case:
    name: str
    path: Callable[[Content], str]
    status: int
    headers: Callable[[Content], dict[str, str]] = lambda c: {}
    body: Callable[[Content], bytes] | None = None  # exact body
    error: str | None = None  # OCI error code in a JSON body
    request_headers: dict[str, str] = field(default_factory=dict)
    methods: tuple[str, ...] = ("GET", "HEAD")


def layer_headers(c: Content) -> dict[str, str]:
    return {
        "docker-content-digest": c.layer,
        "oci-namespace": "docker.io",
        "accept-ranges": "bytes",
    }


CASES = [
    Case("api version", lambda c: "/v2/", 200, lambda c: {"content-length": "0"}, lambda c: b""),
    Case("api version no slash", lambda c: "/v2", 200, body=lambda c: b""),
    Case("livez", lambda c: "/livez", 200, body=lambda c: b""),
    Case("readyz", lambda c: "/readyz", 200, body=lambda c: b""),
    Case("other path", lambda c: "/metrics", 404, lambda c: {"content-length": "0"}, lambda c: b""),
    Case("catalog", lambda c: "/v2/_catalog", 404, error="UNSUPPORTED"),
    Case("tags list", lambda c: "/v2/library/app/tags/list?ns=docker.io", 404, error="UNSUPPORTED"),
    Case(
        "manifest by tag",
        lambda c: "/v2/library/app/manifests/v1?ns=docker.io",
        200,
        lambda c: {
            "content-type": OCI_INDEX,
            "docker-content-digest": c.index,
            "oci-namespace": "docker.io",
        },
    ),
    Case(
        "manifest by digest",
        lambda c: f"/v2/library/app/manifests/{c.manifest}?ns=docker.io",
        200,
        lambda c: {
            "content-type": OCI_MANIFEST,
            "docker-content-digest": c.manifest,
            "content-length": str(len(c.manifest_bytes)),
        },
        lambda c: c.manifest_bytes,
    ),
    Case(
        "manifest ignores range",
        lambda c: f"/v2/library/app/manifests/{c.manifest}?ns=docker.io",
        200,
        body=lambda c: c.manifest_bytes,
        request_headers={"Range": "bytes=0-1"},
    ),
    Case(
        "blob as manifest",
        lambda c: f"/v2/library/app/manifests/{c.layer}?ns=docker.io",
        404,
        error="MANIFEST_UNKNOWN",
    ),
    Case(
        "manifest as blob",
        lambda c: f"/v2/library/app/blobs/{c.manifest}?ns=docker.io",
        404,
        error="BLOB_UNKNOWN",
    ),
    Case(
        "blob",
        lambda c: f"/v2/library/app/blobs/{c.layer}?ns=docker.io",
        200,
        lambda c: {
            **layer_headers(c),
            "content-type": OCTET_STREAM,
            "content-length": str(LAYER_SIZE),
        },
        lambda c: c.layer_bytes,
    ),
    Case(
        "config blob",
        lambda c: f"/v2/library/app/blobs/{c.config}?ns=docker.io",
        200,
        lambda c: {"content-type": OCI_CONFIG},
    ),
    Case(
        "range a-b",
        lambda c: f"/v2/library/app/blobs/{c.layer}?ns=docker.io",
        206,
        lambda c: {
            **layer_headers(c),
            "content-type": OCTET_STREAM,
            "content-length": "10",
            "content-range": f"bytes 5-14/{LAYER_SIZE}",
        },
        lambda c: c.layer_bytes[5:15],
        request_headers={"Range": "bytes=5-14"},
    ),
    Case(
        "range a-",
        lambda c: f"/v2/library/app/blobs/{c.layer}?ns=docker.io",
        206,
        lambda c: {"content-range": f"bytes 1000-{LAYER_SIZE - 1}/{LAYER_SIZE}"},
        lambda c: c.layer_bytes[1000:],
        request_headers={"Range": "bytes=1000-"},
    ),
    Case(
        "range suffix",
        lambda c: f"/v2/library/app/blobs/{c.layer}?ns=docker.io",
        206,
        lambda c: {
            "content-range": f"bytes {LAYER_SIZE - 4}-{LAYER_SIZE - 1}/{LAYER_SIZE}",
            "content-length": "4",
        },
        lambda c: b"tail",
        request_headers={"Range": "bytes=-4"},
    ),
    Case(
        "range clamped end",
        lambda c: f"/v2/library/app/blobs/{c.layer}?ns=docker.io",
        206,
        lambda c: {"content-range": f"bytes {LAYER_SIZE - 2}-{LAYER_SIZE - 1}/{LAYER_SIZE}"},
        lambda c: b"il",
        request_headers={"Range": f"bytes={LAYER_SIZE - 2}-{LAYER_SIZE * 2}"},
    ),
    Case(
        "range unsatisfiable",
        lambda c: f"/v2/library/app/blobs/{c.layer}?ns=docker.io",
        416,
        lambda c: {"content-range": f"bytes */{LAYER_SIZE}"},
        error="RANGE_INVALID",
        request_headers={"Range": f"bytes={LAYER_SIZE}-"},
    ),
    Case(
        "range malformed",
        lambda c: f"/v2/library/app/blobs/{c.layer}?ns=docker.io",
        400,
        error="RANGE_INVALID",
        request_headers={"Range": "bytes=x-y"},
    ),
    Case(
        "range multiple",
        lambda c: f"/v2/library/app/blobs/{c.layer}?ns=docker.io",
        400,
        error="RANGE_INVALID",
        request_headers={"Range": "bytes=0-1,4-5"},
    ),
    Case(
        "range other unit",
        lambda c: f"/v2/library/app/blobs/{c.layer}?ns=docker.io",
        400,
        error="RANGE_INVALID",
        request_headers={"Range": "items=0-1"},
    ),
    Case("tag without ns", lambda c: "/v2/library/app/manifests/v1", 404, error="NAME_UNKNOWN"),
    Case(
        "digest without ns", lambda c: f"/v2/library/app/blobs/{c.layer}", 404, error="NAME_UNKNOWN"
    ),
    Case("bad ns", lambda c: f"/v2/library/app/blobs/{c.layer}?ns=a_b", 404, error="NAME_INVALID"),
    Case(
        "bad digest",
        lambda c: "/v2/library/app/blobs/sha256:abc?ns=docker.io",
        404,
        error="DIGEST_INVALID",
    ),
    Case(
        "sha512 digest",
        lambda c: f"/v2/library/app/blobs/sha512:{'a' * 128}?ns=docker.io",
        404,
        error="DIGEST_INVALID",
    ),
    Case(
        "bad repository",
        lambda c: "/v2/Library/app/manifests/v1?ns=docker.io",
        404,
        error="NAME_INVALID",
    ),
    Case(
        "bad tag", lambda c: "/v2/library/app/manifests/-v1?ns=docker.io", 404, error="TAG_INVALID"
    ),
    Case(
        "unknown blob",
        lambda c: f"/v2/library/app/blobs/{UNKNOWN}?ns=docker.io",
        404,
        error="BLOB_UNKNOWN",
    ),
    Case(
        "unknown tag",
        lambda c: "/v2/library/app/manifests/v2?ns=docker.io",
        404,
        error="MANIFEST_UNKNOWN",
    ),
    Case(
        "unknown blob, mirrored",
        lambda c: f"/v2/library/app/blobs/{UNKNOWN}?ns=docker.io",
        404,
        error="BLOB_UNKNOWN",
        request_headers={"X-Spegel-Mirrored": "true"},
    ),
    Case("other registry", lambda c: f"/v2/library/app/blobs/{c.layer}?ns=ghcr.io", 200),
    Case("POST", lambda c: "/v2/", 404, body=lambda c: b"", methods=("POST",)),
    Case(
        "PUT blob",
        lambda c: f"/v2/library/app/blobs/{c.layer}?ns=docker.io",
        404,
        body=lambda c: b"",
        methods=("PUT", "DELETE", "PATCH", "OPTIONS"),
    ),
    Case(
        "POST upload",
        lambda c: "/v2/library/app/blobs/uploads/?ns=docker.io",
        404,
        body=lambda c: b"",
        methods=("POST",),
    ),
]


@pytest.mark.parametrize("backing", ["memory", "files", "files-hypercorn"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_local_serving(
    case: Case, backing: str, start_node: StartNode, tmp_path: Path
) -> None:
    store = MemoryContentStore()
    files = None if backing == "memory" else tmp_path
    content = fill(store, files=files)
    fill(store, registry="ghcr.io", files=files)
    # the same app on both servers; only ours offers the zero-copy extension (`stats.served`)
    node = await start_node(store, server="hypercorn" if backing == "files-hypercorn" else "h11")
    async with node.client() as client:
        responses = {}
        for method in case.methods:
            response = await client.request(
                method, case.path(content), headers=case.request_headers
            )
            responses[method] = response
            assert response.status_code == case.status, (method, response.content)
            for name, value in case.headers(content).items():
                assert response.headers.get(name) == value, (method, name)
            if method == "HEAD":
                assert response.content == b""
                continue
            assert int(response.headers["content-length"]) == len(response.content)
            if case.body is not None:
                assert response.content == case.body(content)
            if case.error is not None:
                assert response.headers["content-type"] == "application/json"
                body = json.loads(response.content)
                assert body["errors"][0]["code"] == case.error
                assert body["errors"][0]["message"]
            elif case.status >= 400:
                assert "content-type" not in response.headers
        if "GET" in responses and "HEAD" in responses:
            get, head = responses["GET"], responses["HEAD"]
            for name in (
                "content-type",
                "content-length",
                "docker-content-digest",
                "content-range",
                "accept-ranges",
                "oci-namespace",
            ):
                assert head.headers.get(name) == get.headers.get(name), name
    if backing != "files" or case.status not in (200, 206) or "/blobs/" not in case.path(content):
        assert node.stats.served == 0
    else:
        assert node.stats.served == len(case.methods)  # served by sendfile
    if case.request_headers.get("X-Spegel-Mirrored") == "true":
        assert node.router.resolved == []


async def test_not_ready(start_node: StartNode) -> None:
    node = await start_node(settings=RegistrySettings(readiness=lambda: False))
    async with node.client() as client:
        for method in ("GET", "HEAD"):
            response = await client.request(method, "/readyz")
            assert response.status_code == 500
            assert response.content == b""


async def test_readiness_errors_mean_not_ready(start_node: StartNode) -> None:
    def broken() -> bool:
        raise RuntimeError("boom")

    node = await start_node(settings=RegistrySettings(readiness=broken))
    async with node.client() as client:
        assert (await client.get("/readyz")).status_code == 500
        assert (await client.get("/livez")).status_code == 200


async def test_readiness_defaults_to_router(start_node: StartNode) -> None:
    node = await start_node()
    node.router.set_ready(False)
    async with node.client() as client:
        assert (await client.get("/readyz")).status_code == 500
        node.router.set_ready(True)
        assert (await client.get("/readyz")).status_code == 200


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_filters(method: str, start_node: StartNode) -> None:
    store = MemoryContentStore()
    content = fill(store)
    other = fill(store, registry="ghcr.io")
    store.tag("docker.io/library/app:latest", content.index)
    filters = ReferenceFilter.from_config(["https://docker.io"], [":latest$"])
    node = await start_node(store, settings=RegistrySettings(filters=filters))
    async with node.client() as client:
        ok = await client.request(method, "/v2/library/app/manifests/v1?ns=docker.io")
        assert ok.status_code == 200
        latest = await client.request(method, "/v2/library/app/manifests/latest?ns=docker.io")
        assert (latest.status_code, latest.content) == (404, b"")
        assert latest.headers["content-length"] == "0"
        by_digest = await client.request(
            method, f"/v2/library/app/manifests/{content.index}?ns=docker.io"
        )
        assert by_digest.status_code == 200
        ghcr = await client.request(method, f"/v2/library/app/blobs/{other.layer}?ns=ghcr.io")
        assert (ghcr.status_code, ghcr.content) == (404, b"")
    assert node.router.resolved == []


async def test_mirror_miss_error_body(start_node: StartNode) -> None:
    node = await start_node()
    async with node.client() as client:
        response = await client.get(f"/v2/a/blobs/{UNKNOWN}?ns=docker.io")
    assert response.status_code == 404
    assert json.loads(response.content) == {
        "errors": [
            {
                "code": "BLOB_UNKNOWN",
                "message": f"could not find peer for {UNKNOWN}",
                "detail": {"attempts": 0},
            }
        ]
    }
    assert node.router.resolved == [UNKNOWN]
