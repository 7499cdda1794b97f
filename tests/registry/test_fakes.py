"""The in-memory Router and ContentStore behave as the interfaces promise."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from registry.interfaces import ContentNotFound, ContentStore, Peer, PeerState, Router
from registry.oci.mediatypes import OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, OCTET_STREAM
from tests.fakes import (
    MemoryContentStore,
    MemoryNetwork,
    MemoryRouter,
    _Lookup,
    _Reader,
    sha256_digest,
)

from .conformance import check_content_store, check_router


def peer(n: int) -> Peer:
    return Peer(node_id=bytes([n]) * 32, host="127.0.0.1", port=5000 + n)


async def collect(router: Router, key: str) -> list[Peer]:
    async with router.resolve(key) as peers:
        return [p async for p in peers]


async def test_routers_share_a_network_and_exclude_self() -> None:
    net = MemoryNetwork()
    a, b, c = net.router(peer(1)), net.router(peer(2)), net.router(peer(3))
    await a.advertise(["k"])
    await b.advertise(["k"])
    assert await collect(c, "k") == [peer(1), peer(2)]
    assert await collect(a, "k") == [peer(2)]
    assert await collect(c, "other") == []
    await a.withdraw(["k"])
    assert await collect(c, "k") == [peer(2)]
    assert c.resolved == ["k", "other", "k"]


async def test_slow_and_non_converging_lookups(autojump_clock: trio.abc.Clock) -> None:
    net = MemoryNetwork()
    net.add("k", peer(1))
    router = MemoryRouter(net, peer(9), lookup_delay=0.05, converges=False)
    start = trio.current_time()
    got: list[Peer] = []
    with trio.move_on_after(1):
        async with router.resolve("k") as peers:
            async for p in peers:
                got.append(p)
    assert got == [peer(1)]
    assert trio.current_time() - start == pytest.approx(1)


async def test_content_store_memory_and_files(tmp_path: Path) -> None:
    store = MemoryContentStore()
    manifest = json.dumps({"schemaVersion": 2, "config": {}, "layers": []}).encode()
    m = store.add(manifest)
    layer = tmp_path / "layer"
    layer.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 9000)
    blob = store.add_file(layer)
    assert blob == sha256_digest(layer.read_bytes())
    store.tag("docker.io/a/b:v1", m)
    cs: ContentStore = store
    assert await cs.resolve_tag("docker.io/a/b:v1") == m
    assert (await cs.describe(m)).media_type == OCI_MANIFEST
    d = await cs.describe(blob)
    assert (d.size, d.media_type) == (layer.stat().st_size, OCTET_STREAM)
    async with cs.open(blob) as reader:
        assert reader.path == str(layer)
        data = b"".join([c async for c in reader.read(10, reader.size - 20)])
    assert data == layer.read_bytes()[10:-10]
    async with cs.open(m) as reader:
        assert reader.path is None
        assert b"".join([c async for c in reader.read(0, reader.size)]) == manifest
    with pytest.raises(ContentNotFound):
        await cs.resolve_tag("docker.io/a/b:v2")
    with pytest.raises(ContentNotFound):
        await cs.describe("sha256:" + "0" * 64)
    with pytest.raises(ContentNotFound):
        async with cs.open("sha256:" + "0" * 64):
            pass
    weird = store.add(b'{"hello": 1}')
    with pytest.raises(ContentNotFound):
        await cs.describe(weird)


async def test_load_oci_layout(tmp_path: Path) -> None:
    blobs = tmp_path / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        digest = sha256_digest(data)
        (blobs / digest.removeprefix("sha256:")).write_bytes(data)
        return digest

    config = put(json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {}}).encode())
    index = put(json.dumps({"schemaVersion": 2, "manifests": []}).encode())
    (tmp_path / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {"digest": index, "annotations": {"org.opencontainers.image.ref.name": "v1"}}
                ],
            }
        )
    )
    store = MemoryContentStore.from_oci_layout(tmp_path, "example.com/x")
    assert await store.resolve_tag("example.com/x:v1") == index
    assert (await store.describe(index)).media_type == OCI_INDEX
    assert (await store.describe(config)).media_type == OCI_CONFIG


async def test_fakes_pass_the_conformance_checks(tmp_path: Path) -> None:
    store = MemoryContentStore()
    layer = b"\x1f\x8b" + bytes(range(256)) * 10
    manifest = json.dumps({"schemaVersion": 2, "config": {}, "layers": []}).encode()
    (tmp_path / "layer").write_bytes(layer)
    blobs = {store.add_file(tmp_path / "layer"): layer, store.add(manifest): manifest}
    store.tag("docker.io/a/b:v1", sha256_digest(manifest))
    await check_content_store(store, blobs, {"docker.io/a/b:v1": sha256_digest(manifest)})
    net = MemoryNetwork()
    await check_router(net.router(peer(1)), net.router(peer(2)), peer(1))


class _SelfFindingRouter(MemoryRouter):
    """Broken on purpose: its lookups include itself."""

    @asynccontextmanager
    async def resolve(self, key: str) -> AsyncIterator[AsyncIterator[Peer]]:
        async with super().resolve(key) as peers:
            found = [p async for p in peers] + ([self.self_peer] if self.self_peer else [])
            yield _Lookup(found, 0.0, True)


class _StatelessRouter(MemoryRouter):
    """Broken on purpose: every record it advertises says COMPLETE."""

    async def advertise(self, keys: Iterable[str], state: PeerState = PeerState.COMPLETE) -> None:
        await super().advertise(keys)


class _OffsetBlindStore(MemoryContentStore):
    """Broken on purpose: its readers read from the start whatever the offset."""

    @asynccontextmanager
    async def open(self, digest: str) -> AsyncIterator[_Reader]:
        async with super().open(digest) as reader:
            whole = reader.read

            def read(offset: int, length: int) -> AsyncIterator[bytes]:
                return whole(0, length)

            reader.read = read  # type: ignore[method-assign]
            yield reader


async def test_the_conformance_checks_catch_broken_implementations(
    autojump_clock: trio.abc.Clock,
) -> None:
    for broken in (_SelfFindingRouter, _StatelessRouter):
        net = MemoryNetwork()
        provider = broken(net, peer(1))
        with pytest.raises((AssertionError, trio.TooSlowError)):
            await check_router(provider, net.router(peer(2)), peer(1))
    store = _OffsetBlindStore()
    layer = b"\x1f\x8b" + bytes(range(256)) * 10
    with pytest.raises(AssertionError):
        await check_content_store(store, {store.add(layer): layer}, {})
