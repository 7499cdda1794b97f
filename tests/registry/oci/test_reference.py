"""Digest, repository, tag, registry-host and containerd image-name parsing (Appendix B)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry.oci.reference import (
    Reference,
    ReferenceError,
    is_digest,
    parse_digest,
    parse_image_name,
    validate_registry,
    validate_repository,
    validate_tag,
)

D = "sha256:" + "ab" * 32
D2 = "sha256:" + "cd" * 32


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "empty"),
        ("abc", "prefix"),
        ("sha512:" + "a" * 128, "unsupported digest algorithm"),
        ("sha256:" + "a" * 63, "63 hex digits"),
        ("sha256:" + "A" * 64, "lowercase"),
        ("sha256:" + "g" * 64, "lowercase"),
        ("sha256:" + "a" * 64 + "\n", "65 hex"),
        ("!!:zz", "invalid digest"),
    ],
)
def test_bad_digests_say_why(value: str, message: str) -> None:
    assert not is_digest(value)
    with pytest.raises(ReferenceError, match=message):
        parse_digest(value)


def test_good_digest() -> None:
    assert parse_digest(D) == D
    assert is_digest(D)


@given(st.text(max_size=80))
def test_digest_parser_never_crashes(value: str) -> None:
    try:
        assert parse_digest(value) == value
    except ReferenceError:
        pass


@pytest.mark.parametrize(
    "repo",
    ["a", "library/nginx", "a.b_c__d--e/f-g", "x/y/z", "0/1"],
)
def test_good_repositories(repo: str) -> None:
    assert validate_repository(repo) == repo


@pytest.mark.parametrize(
    "repo",
    ["", "A", "a/", "/a", "a//b", "a___b", "a.-b", "-a", "a_", "a" * 256, "a b", "a:b"],
)
def test_bad_repositories(repo: str) -> None:
    with pytest.raises(ReferenceError):
        validate_repository(repo)


@pytest.mark.parametrize("tag", ["latest", "1.25", "_x", "A-b.c_d", "a" * 128])
def test_good_tags(tag: str) -> None:
    assert validate_tag(tag) == tag


@pytest.mark.parametrize("tag", ["", ".a", "-a", "a" * 129, "a:b", "a/b", "a@b"])
def test_bad_tags(tag: str) -> None:
    with pytest.raises(ReferenceError):
        validate_tag(tag)


@pytest.mark.parametrize(
    "host",
    [
        "docker.io",
        "foo.bar:5000",
        "localhost",
        "localhost:5000",
        "127.0.0.1:80",
        "[::1]:5000",
        "[fe80::1]",
        "registry-1",
    ],
)
def test_good_registry_hosts(host: str) -> None:
    assert validate_registry(host) == host


@pytest.mark.parametrize(
    "host",
    [
        "",
        "::1",
        "a:b:c",
        "[::1",
        "[zz::]",
        "foo:0",
        "foo:70000",
        "foo:x",
        "-a.b",
        "a_b.c",
        "[::1]x",
    ],
)
def test_bad_registry_hosts(host: str) -> None:
    with pytest.raises(ReferenceError):
        validate_registry(host)


def test_reference_forms() -> None:
    tagged = Reference("docker.io", "library/nginx", "1.25")
    assert tagged.identifier == "docker.io/library/nginx:1.25"
    assert tagged.tag_key == "docker.io/library/nginx:1.25"
    assert str(tagged) == "docker.io/library/nginx:1.25"
    both = Reference("ghcr.io", "a/b", "v1", D)
    assert both.identifier == D
    assert both.tag_key == "ghcr.io/a/b:v1"
    assert str(both) == f"ghcr.io/a/b:v1@{D}"
    assert both.filter_subject == "ghcr.io/a/b:v1"
    digest_only = Reference("ghcr.io", "a/b", digest=D)
    assert digest_only.tag_key is None
    assert digest_only.filter_subject == "ghcr.io/a/b"
    with pytest.raises(ReferenceError, match="tag or a digest"):
        Reference("ghcr.io", "a/b")
    with pytest.raises(ReferenceError):
        Reference("ghcr.io", "A", "v1")


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        (f"docker.io/library/nginx:1.25@{D}", {}, ("docker.io", "library/nginx", "1.25", D)),
        ("docker.io/library/nginx:1.25", {"digest": D}, ("docker.io", "library/nginx", "1.25", D)),
        (f"ghcr.io/a/b@{D}", {}, ("ghcr.io", "a/b", None, D)),
        ("localhost:5000/x:y", {"allow_tag_only": True}, ("localhost:5000", "x", "y", None)),
        ("localhost/x:y", {"require_digest": False}, ("localhost", "x", "y", None)),
        ("127.0.0.1:5000/x:y", {"digest": D}, ("127.0.0.1:5000", "x", "y", D)),
        ("[::1]:5000/x:y", {"digest": D}, ("[::1]:5000", "x", "y", D)),
        ("registry:5000/x:y", {"digest": D}, ("registry:5000", "x", "y", D)),
        ("nginx", {"apply_defaults": True}, ("docker.io", "library/nginx", "latest", None)),
        ("foo/bar:1", {"apply_defaults": True}, ("docker.io", "foo/bar", "1", None)),
        ("quay.io/x", {"apply_defaults": True}, ("quay.io", "x", "latest", None)),
    ],
)
def test_parse_image_name(
    name: str, kwargs: dict[str, object], expected: tuple[object, ...]
) -> None:
    ref = parse_image_name(name, **kwargs)  # type: ignore[arg-type]
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == expected


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("", {}, "empty"),
        ("https://docker.io/a:b", {"digest": D}, "URL scheme"),
        ("docker.io/library/nginx:1.25", {}, "needs a digest"),
        ("docker.io/library/nginx", {"allow_tag_only": True}, "tag or a digest"),
        ("library/nginx:1", {"digest": D}, "no registry"),
        ("nginx:1", {"digest": D}, "no registry"),
        (f"docker.io/a:b@{D}", {"digest": D2}, "does not match"),
        ("docker.io/a:b@sha256:xyz", {}, "sha256"),
        ("docker.io/A:b", {"digest": D}, "repository"),
        ("docker.io/a:.b", {"digest": D}, "tag"),
        ("::1/a:b", {"digest": D}, "brackets"),
        ("docker.io/a b:c", {"digest": D}, "whitespace"),
        ("docker.io/", {"digest": D}, "repository"),
    ],
)
def test_parse_image_name_rejects(name: str, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ReferenceError, match=message):
        parse_image_name(name, **kwargs)  # type: ignore[arg-type]


@given(st.text(max_size=60))
def test_image_name_parser_never_crashes(name: str) -> None:
    try:
        parse_image_name(name, allow_tag_only=True)
    except ReferenceError:
        pass
