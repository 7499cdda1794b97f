"""What keys an image gives: walking one containerd image record to the digests it advertises.

Why: peers find content through the keys each node advertises, so which keys an image yields must
be exactly its present content: the index, the platform manifests that are present, and their
config and layers that are present (missing content is skipped, never advertised), plus the
`registry/repo:tag` key of records named by tag. This module is that logic and nothing else: the
walk over a `ContentSource`, record parsing and filtering, key reference counts across images, the
per-registry gauge values and the distribution-source labels of loose blobs. It has no I/O of its
own beyond the source it is given, so it is tested with fakes; `agent.advertising.state` drives it.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from cachetools import LRUCache

from agent.containerd.client import ContainerdClient, Image, NotFound
from registry.interfaces import Descriptor
from registry.oci.filters import ReferenceFilter
from registry.oci.mediatypes import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST
from registry.oci.reference import Reference, ReferenceError, is_digest, parse_image_name

logger = logging.getLogger(__name__)

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
MANIFEST_READ_LIMIT = 4 * 1024 * 1024  # an index or manifest larger than this is not walked
WALK_LIMIT = 10_000  # descriptors per image: a bound against pathological manifests
SOURCE_LABEL = "containerd.io/distribution.source."


# ---------------------------------------------------------------- walking (pure over a source)


class ContentSource(Protocol):
    """What a walk needs from the content store."""

    async def present(self, digest: str) -> bool: ...

    async def read(self, digest: str, limit: int) -> bytes: ...


def children(media_type: str, data: bytes) -> list[Descriptor]:
    """The descriptors an index or manifest points at; [] for anything else or malformed JSON."""
    if media_type not in INDEX_TYPES and media_type not in MANIFEST_TYPES:
        return []
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return []
    if not isinstance(doc, dict):
        return []
    raw: list[object] = []
    if media_type in INDEX_TYPES:
        manifests = doc.get("manifests")
        raw = list(manifests) if isinstance(manifests, list) else []
    else:
        raw = [doc.get("config")]
        layers = doc.get("layers")
        raw += list(layers) if isinstance(layers, list) else []
    out: list[Descriptor] = []
    for item in raw:
        if not isinstance(item, dict):
            continue
        digest, mt, size = item.get("digest"), item.get("mediaType", ""), item.get("size", 0)
        if isinstance(digest, str) and is_digest(digest) and isinstance(mt, str):
            out.append(Descriptor(digest, size if isinstance(size, int) else 0, mt))
    return out


class ChildrenCache:
    """digest -> children of that index/manifest (content is immutable, so never stale)."""

    def __init__(self, capacity: int = 4096) -> None:
        self._entries: LRUCache[str, tuple[Descriptor, ...]] = LRUCache(maxsize=capacity)

    def get(self, digest: str) -> tuple[Descriptor, ...] | None:
        return self._entries.get(digest)

    def put(self, digest: str, kids: Iterable[Descriptor]) -> tuple[Descriptor, ...]:
        value = self._entries[digest] = tuple(kids)
        return value


async def walk(
    source: ContentSource, root: Descriptor, cache: ChildrenCache | None = None
) -> frozenset[str]:
    """Every digest reachable from `root` that is present; missing content is not descended."""
    cache = cache if cache is not None else ChildrenCache()
    seen: set[str] = set()
    present: set[str] = set()
    stack = [root]
    while stack and len(seen) < WALK_LIMIT:
        desc = stack.pop()
        if desc.digest in seen:
            continue
        seen.add(desc.digest)
        if not await source.present(desc.digest):
            continue
        present.add(desc.digest)
        if desc.media_type in INDEX_TYPES or desc.media_type in MANIFEST_TYPES:
            kids = cache.get(desc.digest)
            if kids is None:
                try:
                    data = await source.read(desc.digest, MANIFEST_READ_LIMIT)
                except (NotFound, ValueError):
                    continue
                kids = cache.put(desc.digest, children(desc.media_type, data))
            stack.extend(reversed(kids))
    return frozenset(present)


class LiveSource:
    """Presence by Content.Info per digest: for walking one image after an event."""

    def __init__(self, client: ContainerdClient) -> None:
        self._client = client

    async def present(self, digest: str) -> bool:
        try:
            await self._client.content_info(digest)
        except NotFound:
            return False
        return True

    async def read(self, digest: str, limit: int) -> bytes:
        return await self._client.read_blob(digest, limit)


class SnapshotSource(LiveSource):
    """Presence from one Content.List of the namespace: for walking every image at once."""

    def __init__(self, client: ContainerdClient, digests: Iterable[str]) -> None:
        super().__init__(client)
        self._digests = frozenset(digests)

    async def present(self, digest: str) -> bool:
        return digest in self._digests


# ---------------------------------------------------------------- images -> keys (pure)


@dataclass(frozen=True, slots=True)
class AdvertisedImage:
    """One image record and the keys it contributes."""

    name: str  # the containerd record name
    registry: str
    repository: str
    tag_key: str | None  # `registry/repo:tag` for records named by tag (without a digest)
    target: str  # the record's target digest (index or manifest)
    digests: frozenset[str]  # present content reachable from target

    @property
    def keys(self) -> frozenset[str]:
        return self.digests if self.tag_key is None else self.digests | {self.tag_key}

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form for the debug page."""
        return {
            "name": self.name,
            "registry": self.registry,
            "repository": self.repository,
            "tag_key": self.tag_key,
            "target": self.target,
            "digests": sorted(self.digests),
        }


def parse_record(image: Image, filters: ReferenceFilter | None) -> Reference | None:
    """The reference of an image record worth advertising, or None (image ids, bad or filtered)."""
    if "/" not in image.name:
        return None  # an image id record (`sha256:...`)
    try:
        ref = parse_image_name(image.name, digest=image.target.digest)
    except ReferenceError as exc:
        logger.warning(
            "skipping image with unparsable name", extra={"image": image.name, "error": str(exc)}
        )
        return None
    if filters is not None and filters.is_filtered(ref):
        return None
    return ref


async def image_keys(
    source: ContentSource, image: Image, ref: Reference, cache: ChildrenCache | None = None
) -> AdvertisedImage:
    digests = await walk(source, image.target, cache)
    # The tag key is served by looking up the record named exactly `registry/repo:tag`
    # (`ContentStore.resolve_tag`); a record named `registry/repo:tag@sha256:...` (ctr keeps
    # pinned names verbatim) is not found that way, so its tag is not advertised: a peer would
    # get a 404 for it.  Its digests are advertised as usual.
    servable_tag = ref.tag is not None and "@" not in image.name
    return AdvertisedImage(
        name=image.name,
        registry=ref.registry,
        repository=ref.repository,
        tag_key=ref.tag_key if servable_tag else None,
        target=image.target.digest,
        digests=digests,
    )


def gauge_values(
    images: Iterable[AdvertisedImage], loose: Mapping[str, frozenset[str]] | None = None
) -> dict[str, dict[str, int]]:
    """Per registry: images, keys, image_tags, image_digests, content_digests (see module doc).

    A digest-only record whose target is also the target of a tagged record of the same
    repository is the same image: it is not counted again.
    """
    images = list(images)
    tagged = {(i.registry, i.repository, i.target) for i in images if i.tag_key is not None}
    tags: Counter[str] = Counter()
    digest_images: Counter[str] = Counter()
    content: dict[str, set[str]] = {}
    for img in images:
        content.setdefault(img.registry, set()).update(img.digests)
        if img.tag_key is not None:
            tags[img.registry] += 1
        elif (img.registry, img.repository, img.target) not in tagged:
            digest_images[img.registry] += 1
    for digest, registries in (loose or {}).items():
        for registry in registries:
            content.setdefault(registry, set()).add(digest)
    out: dict[str, dict[str, int]] = {}
    for registry in set(content) | set(tags) | set(digest_images):
        n_content = len(content.get(registry, ()))
        out[registry] = {
            "images": tags[registry] + digest_images[registry],
            "keys": n_content + tags[registry],
            "image_tags": tags[registry],
            "image_digests": digest_images[registry],
            "content_digests": n_content,
        }
    return out


class KeyCounts:
    """Reference counts of advertised keys; reports which keys appear and disappear."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def change(self, old: Iterable[str], new: Iterable[str]) -> tuple[set[str], set[str]]:
        """Replace one contributor's keys `old` by `new`; return (now advertised, now withdrawn)."""
        old_set, new_set = set(old), set(new)
        added: set[str] = set()
        removed: set[str] = set()
        for key in new_set - old_set:
            self._counts[key] += 1
            if self._counts[key] == 1:
                added.add(key)
        for key in old_set - new_set:
            self._counts[key] -= 1
            if self._counts[key] <= 0:
                del self._counts[key]
                removed.add(key)
        return added, removed

    def keys(self) -> frozenset[str]:
        return frozenset(self._counts)

    def __contains__(self, key: object) -> bool:
        return key in self._counts


def source_registries(
    labels: Mapping[str, str], digest: str, filters: ReferenceFilter | None
) -> frozenset[str]:
    """Registries a blob was pulled from (distribution-source labels) that are not filtered out."""
    out: set[str] = set()
    for key, value in labels.items():
        if not key.startswith(SOURCE_LABEL):
            continue
        registry = key[len(SOURCE_LABEL) :]
        for repository in value.split(","):
            try:
                ref = Reference(registry=registry, repository=repository, digest=digest)
            except ReferenceError:
                continue
            if filters is None or not filters.is_filtered(ref):
                out.add(registry)
    return frozenset(out)
