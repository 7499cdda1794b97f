"""Conformance checks any `ContentStore` / `Router` implementation must pass (fakes and real ones).

Use from another test module, e.g. for the containerd-backed store::

    from tests.registry.conformance import check_content_store
    await check_content_store(store, blobs={digest: data, ...}, tags={"reg/repo:tag": digest})
"""

from __future__ import annotations

import hashlib

import pytest
import trio

from registry.burst.supply import WatchesProviders
from registry.interfaces import ContentNotFound, ContentStore, Peer, PeerState, Router
from registry.oci.mediatypes import MANIFEST_MEDIA_TYPES, OCTET_STREAM

ABSENT = "sha256:" + "0" * 64


async def check_content_store(
    store: ContentStore, blobs: dict[str, bytes], tags: dict[str, str]
) -> None:
    """`blobs` (digest -> exact bytes) and `tags` (`registry/repo:tag` -> digest) are present:
    each reads back exactly, whole and in slices; reads outside the content are refused;
    absent or malformed digests and references are ContentNotFound, never another error."""
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
            tail = b"".join([c async for c in reader.read(len(data) - 1, 1)])
            assert tail == data[-1:]
            for empty_at in (0, len(data)):  # nothing asked, nothing read (not "to the end")
                assert [c async for c in reader.read(empty_at, 0)] in ([], [b""])
            for offset, length in ((1, len(data)), (-1, 1), (0, -1), (len(data) + 1, 0)):
                with pytest.raises(ValueError):  # outside the content: refused, not truncated
                    async for _ in reader.read(offset, length):
                        pass
            if reader.path is not None:
                assert await trio.Path(reader.path).read_bytes() == data
        if digest in tags.values():
            assert descriptor.media_type in MANIFEST_MEDIA_TYPES
    for absent in (ABSENT, "sha256:nothex", "../../etc/passwd", ""):
        with pytest.raises(ContentNotFound):
            await store.describe(absent)
    for bad_reference in ("not a reference", "", "example.invalid/repo@" + ABSENT):
        with pytest.raises(ContentNotFound):
            await store.resolve_tag(bad_reference)
    with pytest.raises(ContentNotFound):
        async with store.open(ABSENT):
            pass


async def _states(router: Router, key: str, node_id: bytes) -> list[PeerState]:
    """The states one lookup of `key` reports for the peer `node_id` (in arrival order)."""
    async with router.resolve(key) as peers:
        return [peer.state async for peer in peers if peer.node_id == node_id]


async def _until_states(router: Router, key: str, node_id: bytes, want: list[PeerState]) -> None:
    """Lookups of a distributed router see a change once it has travelled: ask again until they
    do.  The caller's hang guard bounds the wait."""
    while (got := await _states(router, key, node_id)) != want:  # noqa: ASYNC110
        await trio.sleep(0.01)
    assert got == want


async def check_router(provider: Router, seeker: Router, provider_peer: Peer) -> None:
    """Two routers of one network: what `provider` advertises, `seeker` finds, with the state it
    was advertised with (a switch of state is seen, eventually); an in-flight or claim record
    withdrawn is gone from the seeker's lookups; nobody finds itself; lookups end (converge),
    and one left early or cancelled stops; a Router that pushes (`WatchesProviders`) finds by
    `watch` what it finds by `resolve`, and ends."""
    key, other, absent = ("sha256:" + c * 64 for c in "cef")
    node_id = provider_peer.node_id
    assert provider.ready() and seeker.ready()
    with trio.fail_after(10):  # a hang guard: lookups must converge, changes must travel
        await provider.advertise([key, other])
        await _until_states(seeker, key, node_id, [PeerState.COMPLETE])
        async with seeker.resolve(key) as peers:
            found = [peer async for peer in peers]
        assert provider_peer in found
        await _until_states(seeker, other, node_id, [PeerState.COMPLETE])  # one call, two keys
        async with provider.resolve(key) as peers:
            assert provider_peer not in [peer async for peer in peers]  # never ourselves
        async with seeker.resolve(absent) as peers:
            assert [peer async for peer in peers] == []
        async with seeker.resolve(key) as peers:  # left at the first peer: the lookup stops
            async for _ in peers:
                break
        with trio.CancelScope() as cancelled:  # cancelled while it waits: it stops at once
            async with seeker.resolve(absent) as peers:
                cancelled.cancel()
                async for _ in peers:
                    pass
        assert cancelled.cancelled_caught
        if isinstance(seeker, WatchesProviders):  # the optional push face finds the same
            for wanted, expected in ((key, [provider_peer]), (absent, [])):
                pushed: list[Peer] = []
                ended = trio.Event()
                handle = seeker.watch(wanted, pushed.append, ended.set)
                await ended.wait()
                handle.cancel()  # after the end: harmless
                assert [p for p in pushed if p.node_id == node_id] == expected

        # the download's states: claimed, in flight, committed; a dropped claim is withdrawn
        transient = "sha256:" + "a" * 64
        for state in (PeerState.CLAIM, PeerState.INFLIGHT):
            await provider.advertise([transient], state)
            await _until_states(seeker, transient, node_id, [state])
        await provider.withdraw([transient])
        await _until_states(seeker, transient, node_id, [])
        await provider.advertise([transient], PeerState.INFLIGHT)
        await _until_states(seeker, transient, node_id, [PeerState.INFLIGHT])
        await provider.advertise([transient], PeerState.COMPLETE)
        await _until_states(seeker, transient, node_id, [PeerState.COMPLETE])
    await provider.withdraw([key, other, transient])
