"""Media types for content containerd holds: a cheap sniff, the project's detector, a digest cache.

Why: containerd's content store keeps no media type per blob, yet the registry must answer with
one (Content-Type) and must tell manifests from blobs. The fingerprinting rules (Spegel's) live in
`registry.oci.mediatypes.detect_media_type`, shared with the in-memory store; this module adds what
the containerd-backed store needs around it:

- `may_be_json_object(prefix)`: a first look at a few bytes, so small gzip/tar layers are classified
  `application/octet-stream` without reading them whole;
- `media_type_of(size, data)`: the detector, except that JSON of an unknown shape (Spegel: an
  error, so "not found") is `application/octet-stream` here: such a blob is still served as a blob,
  never as a manifest;
- `MediaTypeCache`: content is immutable per digest, so a detection is done once.
"""

from __future__ import annotations

from cachetools import LRUCache

from registry.oci.mediatypes import OCTET_STREAM, SNIFF_LIMIT, detect_media_type

__all__ = ["OCTET_STREAM", "MediaTypeCache", "may_be_json_object", "media_type_of", "needs_content"]


def needs_content(size: int) -> bool:
    """Whether the bytes of a blob of this size are needed to classify it (else it is a blob)."""
    return size <= SNIFF_LIMIT


def may_be_json_object(prefix: bytes) -> bool:
    """False when the first bytes of a blob already rule a JSON object out (a gzip or tar layer)."""
    stripped = prefix.lstrip(b" \t\r\n")
    return not stripped or stripped.startswith(b"{")


def media_type_of(size: int, data: bytes | None) -> str:
    """The media type of a blob of `size` bytes with content `data` (None when size is too big)."""
    if not needs_content(size):
        return OCTET_STREAM
    if data is None:
        raise ValueError("content is needed to detect the media type of a small blob")
    try:
        return detect_media_type(size, data)
    except ValueError:
        return OCTET_STREAM


class MediaTypeCache:
    """A bounded LRU of digest -> detected media type."""

    def __init__(self, capacity: int = 4096) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._entries: LRUCache[str, str] = LRUCache(maxsize=capacity)

    def get(self, digest: str) -> str | None:
        return self._entries.get(digest)

    def put(self, digest: str, media_type: str) -> None:
        self._entries[digest] = media_type

    def __len__(self) -> int:
        return len(self._entries)
