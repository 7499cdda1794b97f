"""`--mirrored-registries` and `--registry-filters` as Spegel has them."""

from __future__ import annotations

import pytest

from registry.oci.filters import ReferenceFilter, parse_mirrored_registry
from registry.oci.reference import Reference

D = "sha256:" + "ab" * 32


def ref(
    registry: str, repo: str = "a/b", tag: str | None = "v1", digest: str | None = None
) -> Reference:
    return Reference(registry, repo, tag, digest)


@pytest.mark.parametrize(
    "mirrored", [[], ["_default"], ["*"], ["https://docker.io", "*"], ["", " "]]
)
def test_wildcards_mirror_everything(mirrored: list[str]) -> None:
    f = ReferenceFilter.from_config(mirrored, [])
    assert not f.is_filtered(ref("anything.example"))


def test_whitelist_of_hosts() -> None:
    f = ReferenceFilter.from_config(["https://docker.io", "http://foo:5000/"], [])
    assert not f.is_filtered(ref("docker.io"))
    assert not f.is_filtered(ref("foo:5000"))
    assert f.is_filtered(ref("foo"))
    assert f.is_filtered(ref("ghcr.io"))
    assert f.is_filtered(ref("ghcr.io", tag=None, digest=D))


def test_regex_filters_match_registry_repo_tag_but_not_digest() -> None:
    f = ReferenceFilter.from_config([], [":latest$", "^ghcr\\.io/private/"])
    assert f.is_filtered(ref("docker.io", tag="latest"))
    assert not f.is_filtered(ref("docker.io", tag="latest2"))
    assert not f.is_filtered(ref("docker.io", tag=None, digest=D))
    assert f.is_filtered(ref("ghcr.io", "private/x", tag=None, digest=D))
    assert not f.is_filtered(ref("ghcr.io", "public/x"))
    # unanchored search like Go's MatchString
    assert ReferenceFilter.from_config([], ["nginx"]).is_filtered(ref("docker.io", "library/nginx"))


def test_default_filter_lets_everything_through() -> None:
    assert not ReferenceFilter().is_filtered(ref("x.io"))


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("https://docker.io", "docker.io"),
        ("http://foo:5000", "foo:5000"),
        ("https://[::1]:5000", "[::1]:5000"),
        ("http://127.0.0.1", "127.0.0.1"),
    ],
)
def test_parse_mirrored_registry(url: str, host: str) -> None:
    assert parse_mirrored_registry(url) == host


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("docker.io", "scheme"),
        ("ftp://docker.io", "scheme"),
        ("https://", "missing host"),
        ("https://u:p@docker.io", "user info"),
        ("https://docker.io/v2", "path"),
        ("https://docker.io?x=1", "path or query"),
        ("https://docker.io:99999", "invalid mirrored registry"),
        ("https://bad_host.io", "invalid registry host"),
    ],
)
def test_bad_mirrored_registries(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ReferenceFilter.from_config([url], [])


@pytest.mark.parametrize("expression", ["(", "[a-", ""])
def test_bad_regex(expression: str) -> None:
    with pytest.raises(ValueError, match="registry filter"):
        ReferenceFilter.from_config([], [expression])
