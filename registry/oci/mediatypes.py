"""OCI/Docker media types and content fingerprinting (Spegel's media type detection).

Why: containerd does not record a media type per blob, yet the registry must tell manifests from
blobs (a manifest is never served as a blob and vice versa) and send a `Content-Type`.  The content
store fingerprints content with `detect_media_type`; the registry uses the sets below.
"""

from __future__ import annotations

import json

__all__ = [
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "MANIFEST_MEDIA_TYPES",
    "OCI_CONFIG",
    "OCI_EMPTY",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "OCTET_STREAM",
    "SNIFF_LIMIT",
    "detect_media_type",
    "is_manifest_media_type",
]

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCTET_STREAM = "application/octet-stream"

# The Accept list sent to peers, and the only types served from /manifests/.
MANIFEST_MEDIA_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_MANIFEST_LIST)

SNIFF_LIMIT = 4 * 1024 * 1024  # larger content is never read, it is a blob


def is_manifest_media_type(media_type: str) -> bool:
    """True for the four manifest/index media types."""
    return media_type in MANIFEST_MEDIA_TYPES


def detect_media_type(size: int, head: bytes | None) -> str:
    """Media type of content of `size` bytes whose full bytes are `head` (when size <= SNIFF_LIMIT).

    Content that is not JSON is `application/octet-stream`.  JSON that is none of the known shapes
    raises `ValueError` (callers treat that content as unknown).
    """
    if size > SNIFF_LIMIT or head is None:
        return OCTET_STREAM
    try:
        document = json.loads(head)
    except (ValueError, UnicodeDecodeError):
        return OCTET_STREAM
    if not isinstance(document, dict):
        return OCTET_STREAM
    if not document:
        return OCI_EMPTY
    media_type = document.get("mediaType")
    if document.get("schemaVersion") == 2 and isinstance(media_type, str) and media_type:
        return media_type
    if isinstance(document.get("manifests"), list):
        return OCI_INDEX
    if "config" in document and "layers" in document:
        return OCI_MANIFEST
    if {"architecture", "os", "rootfs"} <= document.keys():
        return OCI_CONFIG
    raise ValueError("JSON content of unknown shape")
