"""Media type detection around the shared detector: sniffing, the unknown-JSON rule, the cache."""

from __future__ import annotations

import gzip
import json

import pytest

from agent.containerd.media_types import (
    MediaTypeCache,
    may_be_json_object,
    media_type_of,
    needs_content,
)
from registry.oci.mediatypes import (
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_MANIFEST,
    OCTET_STREAM,
    SNIFF_LIMIT,
)


def test_sniff_rules_out_layers_from_a_few_bytes() -> None:
    assert not may_be_json_object(gzip.compress(b"tar bytes")[:64])
    assert not may_be_json_object(b"etc/passwd\x00\x00")
    assert may_be_json_object(b'  \n{"schemaVersion"')
    assert may_be_json_object(b"")


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "config": {}, "layers": []},
         DOCKER_MANIFEST),
        ({"schemaVersion": 2, "manifests": []}, OCI_INDEX),
        ({"schemaVersion": 2, "config": {}, "layers": []}, OCI_MANIFEST),
        ({"architecture": "amd64", "os": "linux", "rootfs": {}}, OCI_CONFIG),
        ({"some": "artifact"}, OCTET_STREAM),  # Spegel errors here; we serve it as a blob
        ({}, OCI_EMPTY),
    ],
)  # fmt: skip
def test_media_type_of_json(doc: dict[str, object], expected: str) -> None:
    data = json.dumps(doc).encode()
    assert media_type_of(len(data), data) == expected


def test_media_type_of_non_json_and_large() -> None:
    assert media_type_of(10, b"\x1f\x8b\x08\x00rest") == OCTET_STREAM
    assert media_type_of(3, b"[1]") == OCTET_STREAM
    assert not needs_content(SNIFF_LIMIT + 1)
    assert media_type_of(SNIFF_LIMIT + 1, None) == OCTET_STREAM
    with pytest.raises(ValueError):
        media_type_of(5, None)


def test_cache_is_bounded_lru() -> None:
    cache = MediaTypeCache(capacity=2)
    cache.put("a", "x")
    cache.put("b", "y")
    assert cache.get("a") == "x"  # a is now most recent
    cache.put("c", "z")
    assert cache.get("b") is None
    assert (cache.get("a"), cache.get("c"), len(cache)) == ("x", "z", 2)
    with pytest.raises(ValueError):
        MediaTypeCache(capacity=0)
