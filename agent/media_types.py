"""Media type detection for content containerd holds, from the bytes alone (pure, no I/O).

Why: containerd's content store keeps no media type per blob, yet the registry must answer with
one (Content-Type) and must tell manifests from blobs. Spegel fingerprints the content (spec §3.4),
and so do we:

- larger than 4 MiB: `application/octet-stream` without reading anything (layers);
- not JSON (gzip, tar, ...): `application/octet-stream`;
- exactly `{}`: the OCI empty descriptor type;
- a JSON object with `schemaVersion == 2` and a `mediaType`: that media type;
- else `manifests` (a list) means an OCI index, `config` + `layers` an OCI manifest, and
  `architecture` + `os` + `rootfs` an OCI image config.

One deliberate difference: JSON that fits none of these (Spegel: an error, served as "not found")
is `application/octet-stream` here, so an arbitrary small JSON blob is still served as a blob but
never as a manifest. Content is immutable per digest, so results are cached by digest.
"""

from __future__ import annotations

import json
from collections import OrderedDict

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCTET_STREAM = "application/octet-stream"

# Media types the registry serves on /manifests/ (and never on /blobs/).
MANIFEST_TYPES = frozenset({OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
IMAGE_MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})

# Content above this size is never parsed (and needs no read to be classified).
DETECT_LIMIT = 4 * 1024 * 1024


def needs_content(size: int) -> bool:
    """Whether `detect_media_type` needs the bytes of a blob of this size."""
    return size <= DETECT_LIMIT


def may_be_json_object(prefix: bytes) -> bool:
    """False when the first bytes of a blob already rule JSON out (a gzip or tar layer)."""
    stripped = prefix.lstrip(b" \t\r\n")
    return not stripped or stripped.startswith(b"{")


def detect_media_type(size: int, data: bytes | None) -> str:
    """The media type of a blob of `size` bytes and content `data` (None if `size` is too big)."""
    if not needs_content(size):
        return OCTET_STREAM
    if data is None:
        raise ValueError("content is needed to detect the media type of a small blob")
    if data == b"{}":
        return OCI_EMPTY
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):  # includes UnicodeDecodeError and JSONDecodeError
        return OCTET_STREAM
    if not isinstance(doc, dict):
        return OCTET_STREAM
    media_type = doc.get("mediaType")
    if doc.get("schemaVersion") == 2 and isinstance(media_type, str) and media_type:
        return media_type
    if isinstance(doc.get("manifests"), list):
        return OCI_INDEX
    if "config" in doc and "layers" in doc:
        return OCI_MANIFEST
    if "architecture" in doc and "os" in doc and "rootfs" in doc:
        return OCI_CONFIG
    return OCTET_STREAM


class MediaTypeCache:
    """A bounded LRU of digest -> detected media type (content is immutable per digest)."""

    def __init__(self, capacity: int = 4096) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        self._entries: OrderedDict[str, str] = OrderedDict()

    def get(self, digest: str) -> str | None:
        media_type = self._entries.get(digest)
        if media_type is not None:
            self._entries.move_to_end(digest)
        return media_type

    def put(self, digest: str, media_type: str) -> None:
        self._entries[digest] = media_type
        self._entries.move_to_end(digest)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
