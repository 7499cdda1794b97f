"""Conformance checks any `ContentStore` / `Router` implementation must pass (fakes and real ones).

Use from another test module, e.g. for the containerd-backed store::

    from tests.registry.conformance import check_content_store
    await check_content_store(store, blobs={digest: data, ...}, tags={"reg/repo:tag": digest})
"""

from __future__ import annotations

import hashlib

import pytest
import trio

from registry.interfaces import ContentNotFound, ContentStore, Peer, Router
from registry.oci.mediatypes import MANIFEST_MEDIA_TYPES, OCTET_STREAM

ABSENT = "sha256:" + "0" * 64


async def check_content_store(
    store: ContentStore, blobs: dict[str, bytes], tags: dict[str, str]
) -> None:
    """`blobs` (digest -> exact bytes) and `tags` (`registry/repo:tag` -> digest) are present."""
    for reference, digest in tags.items():
        assert await store.resolve_tag(reference) == digest
    with pytest.raises(ContentNotFound):
        await store.resolve_tag("example.invalid/absent/repo:never")
    for digest, data in blobs.items():
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
        descriptor = await store.describe(digest)
        assert (descriptor.digest, descriptor.size) == (digest, len(data))
        if data.startswith(b"\x1f\x8b"):  # gzip: a layer
            assert descriptor.media_type == OCTET_STREAM
        async with store.open(digest) as reader:
            assert reader.size == len(data)
            whole = b"".join([chunk async for chunk in reader.read(0, reader.size)])
            assert whole == data
            if len(data) > 2:
                middle = b"".join([c async for c in reader.read(1, len(data) - 2)])
                assert middle == data[1:-1]
            if reader.path is not None:
                assert await trio.Path(reader.path).read_bytes() == data
        if digest in tags.values():
            assert descriptor.media_type in MANIFEST_MEDIA_TYPES
    with pytest.raises(ContentNotFound):
        await store.describe(ABSENT)
    with pytest.raises(ContentNotFound):
        async with store.open(ABSENT):
            pass


async def check_router(provider: Router, seeker: Router, provider_peer: Peer) -> None:
    """Two routers of one network: what `provider` advertises, `seeker` finds; lookups end."""
    key = "sha256:" + "c" * 64
    await provider.advertise([key])
    with trio.fail_after(10):  # a hang guard: lookups must converge
        async with seeker.resolve(key) as peers:
            found = [peer async for peer in peers]
        assert provider_peer in found
        async with provider.resolve(key) as peers:
            assert provider_peer not in [peer async for peer in peers]  # never ourselves
        async with seeker.resolve("sha256:" + "d" * 64) as peers:
            assert [peer async for peer in peers] == []
    await provider.withdraw([key])
