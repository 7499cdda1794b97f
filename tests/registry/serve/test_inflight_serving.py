"""A node serves a blob it is still downloading, and a peer mirrors it (real sockets, loopback).

The holder's store also answers `find_inflight` (as the containerd-backed store does with its
ingest watcher); a writer task grows the ingest's data file and finally "commits" it (a rename).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from registry.events import MirrorEvents, TransferProgress
from registry.interfaces import IngestFile, PeerState
from registry.metrics import MIRROR_REQUESTS
from registry.serve.server import ServerKind
from tests.fakes import MemoryContentStore, MemoryRouter
from tests.registry.conftest import SERVERS, Node, StartNode

CONTENT = os.urandom(2 * 1024 * 1024 + 77)
DIGEST = "sha256:" + hashlib.sha256(CONTENT).hexdigest()
PATH = f"/v2/library/app/blobs/{DIGEST}?ns=docker.io"
PEER = {"X-Spegel-Mirrored": "true"}  # what a peer's agent sends


class DownloadingStore(MemoryContentStore):
    """A store with one blob still downloading into `directory`."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        (directory / "ingest").mkdir()
        self.ingest = IngestFile(
            DIGEST, len(CONTENT), str(directory / "ingest" / "data"), str(directory / "blob")
        )
        self.done = False

    def find_inflight(self, digest: str) -> IngestFile | None:
        return self.ingest if digest == DIGEST and not self.done else None


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Virtual time for the tests that ask for it; it jumps once every task has waited 20 ms of
    real time (the loopback I/O here is a few small reads)."""
    return trio.testing.MockClock(autojump_threshold=0.02)


def start_file(path: str) -> None:
    Path(path).write_bytes(CONTENT[:4096])


def append(path: str, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


async def grow(store: DownloadingStore, pause: float = 0.02) -> None:
    """Write the rest slowly, then commit: rename to the blob file and add it to the store."""
    for start in range(4096, len(CONTENT), 128 * 1024):
        await trio.sleep(pause)
        append(store.ingest.data_path, CONTENT[start : start + 128 * 1024])
    os.rename(store.ingest.data_path, store.ingest.blob_path)
    store.add_file(store.ingest.blob_path)
    store.done = True


@pytest.mark.parametrize("registry_server", SERVERS)
async def test_holder_serves_full_size_and_bytes_as_they_land(
    tmp_path: Path, start_node: StartNode, nursery: trio.Nursery, registry_server: ServerKind
) -> None:
    store = DownloadingStore(tmp_path)
    start_file(store.ingest.data_path)
    holder = await start_node(store)
    async with holder.client() as client:
        own = await client.head(PATH)  # this node's containerd: never its own download
        assert own.status_code == 404
        head = await client.head(PATH, headers=PEER)
        assert head.status_code == 200
        assert head.headers["content-length"] == str(len(CONTENT))
        assert head.headers["docker-content-digest"] == DIGEST
        nursery.start_soon(grow, store)
        ranged = await client.get(PATH, headers={**PEER, "Range": "bytes=1000000-1000099"})
        assert ranged.status_code == 206
        assert ranged.content == CONTENT[1000000:1000100]
        full = await client.get(PATH, headers=PEER)  # started before the commit, ends after it
        assert full.status_code == 200 and full.content == CONTENT
    assert store.done
    if registry_server == "h11":
        assert holder.stats.served >= 2  # went out by the server's zero-copy extension


async def test_a_peer_mirrors_an_inflight_blob_and_counts_it(
    tmp_path: Path, start_node: StartNode, nursery: trio.Nursery
) -> None:
    store = DownloadingStore(tmp_path)
    start_file(store.ingest.data_path)
    holder = await start_node(store)
    await holder.router.advertise([DIGEST], PeerState.INFLIGHT)
    requester = await start_node(MemoryContentStore())
    assert isinstance(requester.router, MemoryRouter)
    before = MIRROR_REQUESTS.labels("docker.io", "inflight")._value.get()
    nursery.start_soon(grow, store)
    async with requester.client() as client:
        response = await client.get(PATH)
    assert response.status_code == 200 and response.content == CONTENT
    assert MIRROR_REQUESTS.labels("docker.io", "inflight")._value.get() == before + 1


async def test_an_aborted_download_cuts_the_body_short(
    tmp_path: Path, start_node: StartNode
) -> None:
    store = DownloadingStore(tmp_path)
    start_file(store.ingest.data_path)
    holder = await start_node(store)
    got = await read_until_cut(holder, lambda: os.unlink(store.ingest.data_path))  # aborted
    assert got == CONTENT[:4096]


async def read_until_cut(holder: Node, after_prefix: Callable[[], object]) -> bytes:
    """A peer's GET of the blob from `holder`: `after_prefix()` runs once the first 4096 bytes
    (what the download holds) are in; the body must then end short.  What arrived."""
    async with holder.client() as client:
        async with client.stream("GET", PATH, headers=PEER) as response:
            assert response.status_code == 200
            got = bytearray()
            with pytest.raises(httpx.RemoteProtocolError):
                async for chunk in response.aiter_bytes():
                    got += chunk
                    if len(got) >= 4096:
                        after_prefix()
    return bytes(got)


@pytest.mark.parametrize("registry_server", SERVERS)
async def test_a_download_nobody_writes_any_more_is_cut_at_once_not_after_the_stall_bound(
    clock: trio.testing.MockClock, tmp_path: Path, start_node: StartNode
) -> None:
    """The holder's containerd died mid-download: its file stays, but the store's in-flight
    table drops it (no writer).  A peer's body is cut within a writer check (0.5 s), not after
    the 10 s stall bound, so the peer resumes elsewhere at once."""
    store = DownloadingStore(tmp_path)
    start_file(store.ingest.data_path)
    holder = await start_node(store)
    cut_from: list[float] = []

    def writer_gone() -> None:  # the watcher dropped it: nobody writes it
        store.done = True
        cut_from.append(trio.current_time())

    assert await read_until_cut(holder, writer_gone) == CONTENT[:4096]
    assert trio.current_time() - cut_from[0] < 3.0


async def test_an_inflight_upload_reports_its_progress(
    tmp_path: Path, start_node: StartNode, nursery: trio.Nursery
) -> None:
    store = DownloadingStore(tmp_path)
    start_file(store.ingest.data_path)
    events = MirrorEvents()
    seen: list[TransferProgress] = []
    events.subscribe(lambda e: seen.append(e) if isinstance(e, TransferProgress) else None)
    holder = await start_node(store, events=events)
    nursery.start_soon(grow, store, 0.1)  # ~1.7 s: several progress reports
    async with holder.client() as client:
        response = await client.get(PATH, headers=PEER)
    assert response.content == CONTENT
    assert {e.source for e in seen} == {"inflight"} and {e.direction for e in seen} == {"out"}
    assert seen[0].state == "running" and seen[0].bytes == 0
    assert seen[-1].state == "done" and seen[-1].bytes == len(CONTENT)
    middle = [e.bytes for e in seen[1:-1]]
    assert middle and middle == sorted(middle) and 0 < middle[0] < len(CONTENT)


class DiscardingStore(MemoryContentStore):
    """The requester's store: records which downloads the mirror asked it to drop."""

    def __init__(self) -> None:
        super().__init__()
        self.discarded: list[str] = []

    async def discard_download(self, digest: str) -> None:
        self.discarded.append(digest)


async def test_bad_bytes_from_an_inflight_provider_cut_the_stream_and_drop_the_download(
    start_node: StartNode,
) -> None:
    """An in-flight provider's bytes stream at once (any size) and are hashed on the way; when
    they do not match, the body ends short of its last byte, the provider is quarantined, and
    this node's own download of the digest (fed the bad prefix) is dropped."""
    liar_store = MemoryContentStore()
    bad = bytearray(CONTENT)
    bad[12345] ^= 0xFF
    liar_store.add(bytes(bad), digest=DIGEST)
    liar = await start_node(liar_store)
    await liar.router.advertise([DIGEST], PeerState.INFLIGHT)
    store = DiscardingStore()
    requester = await start_node(store)
    async with requester.client() as client:
        async with client.stream("GET", PATH) as response:
            assert response.status_code == 200  # streamed before the whole blob was checked
            got = bytearray()
            with pytest.raises(httpx.RemoteProtocolError):
                async for chunk in response.aiter_bytes():
                    got += chunk
    assert len(got) < len(CONTENT)  # never the whole (bad) blob
    assert store.discarded == [DIGEST]
    async with requester.client() as client:  # the liar is quarantined: a miss now
        assert (await client.get(PATH)).status_code == 404
