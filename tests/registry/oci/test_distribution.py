"""Path and `ns` parsing and error bodies."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry.oci.distribution import (
    ApiVersionCheck,
    ContentKind,
    ContentRequest,
    ErrorCode,
    PathError,
    error_body,
    parse_request_path,
)

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize("path", ["/v2", "/v2/"])
def test_api_version(path: str) -> None:
    assert parse_request_path(path, None) == ApiVersionCheck()


@pytest.mark.parametrize(
    ("path", "ns", "kind", "tag", "digest", "repo"),
    [
        (
            "/v2/library/nginx/manifests/1.25",
            "docker.io",
            ContentKind.MANIFEST,
            "1.25",
            None,
            "library/nginx",
        ),
        (f"/v2/a/manifests/{D}", "ghcr.io", ContentKind.MANIFEST, None, D, "a"),
        (f"/v2/a/b/c/blobs/{D}", "foo:5000", ContentKind.BLOB, None, D, "a/b/c"),
        (
            "/v2/x/manifests/y/manifests/latest",
            "r.io",
            ContentKind.MANIFEST,
            "latest",
            None,
            "x/manifests/y",
        ),
        (f"/v2/blobs/blobs/{D}", "r.io", ContentKind.BLOB, None, D, "blobs"),
    ],
)
def test_content_paths(
    path: str, ns: str, kind: ContentKind, tag: str | None, digest: str | None, repo: str
) -> None:
    req = parse_request_path(path, ns)
    assert isinstance(req, ContentRequest)
    assert req.kind is kind
    assert (req.reference.registry, req.reference.repository) == (ns, repo)
    assert (req.reference.tag, req.reference.digest) == (tag, digest)
    assert req.path == path


@pytest.mark.parametrize(
    ("path", "ns", "code", "message"),
    [
        ("/v3/", "r.io", ErrorCode.UNSUPPORTED, "not an OCI"),
        ("/v2/_catalog", "r.io", ErrorCode.UNSUPPORTED, "only manifests and blobs"),
        ("/v2/a/tags/list", "r.io", ErrorCode.UNSUPPORTED, "only manifests and blobs"),
        ("/v2/A/manifests/v1", "r.io", ErrorCode.NAME_INVALID, "repository"),
        ("/v2//manifests/v1", "r.io", ErrorCode.NAME_INVALID, "repository"),
        ("/v2/a/manifests/.v1", "r.io", ErrorCode.TAG_INVALID, "tag"),
        ("/v2/a/manifests/", "r.io", ErrorCode.TAG_INVALID, "tag"),
        ("/v2/a/manifests/sha256:abc", "r.io", ErrorCode.DIGEST_INVALID, "64"),
        ("/v2/a/blobs/v1", "r.io", ErrorCode.DIGEST_INVALID, "prefix"),
        ("/v2/a/blobs/md5:" + "a" * 32, "r.io", ErrorCode.DIGEST_INVALID, "algorithm"),
        ("/v2/a/manifests/v1", None, ErrorCode.NAME_UNKNOWN, "tag references"),
        (f"/v2/a/blobs/{D}", "", ErrorCode.NAME_UNKNOWN, "ns needs to be set"),
        (f"/v2/a/blobs/{D}", "bad host!", ErrorCode.NAME_INVALID, "ns parameter"),
        (f"/v2/a/blobs/{D}/extra", "r.io", ErrorCode.DIGEST_INVALID, "digest"),
    ],
)
def test_bad_paths(path: str, ns: str | None, code: ErrorCode, message: str) -> None:
    with pytest.raises(PathError, match=message) as info:
        parse_request_path(path, ns)
    assert info.value.code is code


def test_error_body() -> None:
    body = json.loads(error_body(ErrorCode.BLOB_UNKNOWN, "nope", {"attempts": 2}))
    assert body == {
        "errors": [{"code": "BLOB_UNKNOWN", "message": "nope", "detail": {"attempts": 2}}]
    }
    assert json.loads(error_body(ErrorCode.DENIED, "x")) == {
        "errors": [{"code": "DENIED", "message": "x"}]
    }


@given(st.text(max_size=80), st.one_of(st.none(), st.text(max_size=20)))
def test_never_crashes(path: str, ns: str | None) -> None:
    try:
        parse_request_path("/v2/" + path, ns)
    except PathError:
        pass
