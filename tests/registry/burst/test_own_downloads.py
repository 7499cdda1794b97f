"""A burst never turns into a loop: `OwnDownloads` bookkeeping, and the registry's refusal.

The scene it guards against (seen on real containerd): the node two others streamed a layer from
dies; each of the two then resumes from the other's download, which holds the same prefix and
never grows, and both wait on each other until containerd's pull deadline.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from registry.burst.own_downloads import MAX_CHAIN, OwnDownloads, parse_fed_by
from registry.interfaces import IngestFile, PeerState
from registry.mirror.job import MirrorSettings
from registry.mirror.peer_answer import PeerBusy
from registry.mirror.resume_wait import RefusalRounds
from registry.serve.app import RegistrySettings
from tests.clocks import loopback_clock
from tests.fakes import MemoryContentStore, MemoryNetwork, MemoryRouter
from tests.registry.conftest import SERVERS, ScriptedPeer, StartNode, StartScripted

CONTENT = os.urandom(3 * 1024 * 1024)
DIGEST = "sha256:" + hashlib.sha256(CONTENT).hexdigest()
PATH = f"/v2/library/app/blobs/{DIGEST}?ns=docker.io"
PEER = {"X-Spegel-Mirrored": "true"}


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return loopback_clock()  # virtual time (tests.clocks)


def test_a_download_without_a_source_refuses_everyone() -> None:
    own = OwnDownloads()
    feed = own.open(DIGEST)
    assert own.refusal(DIGEST, "10.0.0.9") is not None
    assert own.refusal("sha256:" + "0" * 64, "10.0.0.9") is None  # another digest
    feed.streaming("10.0.0.2")
    assert own.refusal(DIGEST, "10.0.0.9") is None
    feed.searching()  # its stream broke
    assert own.refusal(DIGEST, "10.0.0.9") is not None
    feed.close()
    assert own.refusal(DIGEST, "10.0.0.9") is None


def test_a_download_refuses_the_nodes_it_is_fed_by_and_says_who_they_are() -> None:
    own = OwnDownloads()
    with own.open(DIGEST) as feed:
        feed.streaming("10.0.0.2", ("10.0.0.3", "10.0.0.4"))
        assert own.refusal(DIGEST, "10.0.0.2") is not None  # its direct source
        assert own.refusal(DIGEST, "10.0.0.4") is not None  # further up the chain
        assert own.refusal(DIGEST, "10.0.0.5") is None
        assert own.fed_by(DIGEST) == ("10.0.0.2", "10.0.0.3", "10.0.0.4")
    assert own.fed_by(DIGEST) == ()


def test_the_fed_by_header_is_parsed_defensively() -> None:
    assert parse_fed_by(None) == ()
    assert parse_fed_by(" 10.0.0.1 , fd00::2,, <script>, 1.2.3.4") == (
        "10.0.0.1",
        "fd00::2",
        "1.2.3.4",
    )
    assert len(parse_fed_by(",".join(f"10.0.0.{i}" for i in range(100)))) == MAX_CHAIN


class StalledDownload(MemoryContentStore):
    """A store whose download of CONTENT holds a prefix and does not grow (its source died)."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        directory.mkdir()
        data = directory / "data"
        data.write_bytes(CONTENT[: 1024 * 1024])
        self.ingest = IngestFile(DIGEST, len(CONTENT), str(data), str(directory / "blob"))

    def find_inflight(self, digest: str) -> IngestFile | None:
        return self.ingest if digest == DIGEST else None


@pytest.mark.parametrize("registry_server", SERVERS)
async def test_a_peer_is_refused_while_this_node_has_no_source_for_it(
    clock: trio.testing.MockClock, start_node: StartNode, tmp_path: Path
) -> None:
    store = StalledDownload(tmp_path / "a")
    node = await start_node(store)
    own = node.registry.forwarder.own
    async with httpx.AsyncClient(base_url=node.url, timeout=10) as http:
        with own.open(DIGEST) as feed:
            refused = await http.get(PATH, headers=PEER)
            feed.streaming("10.0.0.2", ("10.0.0.3",))
            async with http.stream("GET", PATH, headers=PEER) as served:
                fed_by = served.headers.get("spegla-fed-by")
                status = served.status_code
            feed.streaming("127.0.0.1")  # the asking node feeds this one: a loop
            looped = await http.get(PATH, headers=PEER)
    assert refused.status_code == 429 and "no source" in refused.text
    assert status == 200 and fed_by == "10.0.0.2,10.0.0.3"
    assert looped.status_code == 429 and "comes from the asking node" in looped.text


async def test_two_nodes_holding_the_same_stalled_prefix_do_not_wait_on_each_other(
    clock: trio.testing.MockClock, start_node: StartNode, network: MemoryNetwork, tmp_path: Path
) -> None:
    """Both nodes' containerd ask their agent at once; the only providers are each other's
    stalled downloads.  Each refuses the other (no source), so both answer 404 (containerd goes
    upstream) within the resolve budget instead of streaming a prefix that never grows."""
    settings = RegistrySettings(mirror=MirrorSettings(resolve_timeout=0.1, response_timeout=2.0))
    nodes = []
    for name in ("a", "b"):
        router = MemoryRouter(network)
        nodes.append(
            await start_node(StalledDownload(tmp_path / name), settings=settings, router=router)
        )
    for node in nodes:
        network.add(DIGEST, replace(node.peer, state=PeerState.INFLIGHT))
    answers: dict[int, httpx.Response] = {}

    async def pull(i: int) -> None:
        async with nodes[i].client() as http:
            answers[i] = await http.get(PATH)

    started = trio.current_time()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(2):
                nursery.start_soon(pull, i)
    assert [answers[i].status_code for i in range(2)] == [404, 404]
    assert trio.current_time() - started < 1.0


def test_refusal_rounds_are_hopeless_only_when_nobody_is_merely_busy() -> None:
    rounds = RefusalRounds()
    rounds.count(PeerBusy(1.0, "no-source"))
    assert not rounds.hopeless()  # one round is not enough
    rounds.new_round()
    rounds.count(PeerBusy(1.0, "loop"))
    assert rounds.hopeless()
    busy = RefusalRounds()
    for _ in range(5):
        busy.new_round()
        busy.count(PeerBusy(1.0, "no-source"))
        busy.count(PeerBusy(1.0))  # at its upload limit: it will serve, so keep waiting
    assert not busy.hopeless()


async def test_a_half_sent_body_whose_only_providers_refuse_is_cut_at_once(
    clock: trio.testing.MockClock,
    start_node: StartNode,
    start_scripted: StartScripted,
    network: MemoryNetwork,
    tmp_path: Path,
) -> None:
    """Two nodes stream a blob from a source that breaks after 1 MiB (it died); the only other
    providers are each other's downloads, which have no source now.  Each body is cut within a
    second or so (containerd resumes through a fresh request, whose claim sends one node
    upstream), not after the 20 s resume patience."""
    source = await start_scripted(
        ScriptedPeer("cut", body=CONTENT, digest=DIGEST, cut=1 << 20, dies_after=2)
    )
    network.add(DIGEST, source.peer)
    # streamed (not held whole until verified), so the head goes out before the source breaks
    mirror = MirrorSettings(resolve_timeout=0.1, response_timeout=2.0, verify_first_max=1024)
    settings = RegistrySettings(mirror=mirror)
    nodes = [
        await start_node(
            StalledDownload(tmp_path / name), settings=settings, router=MemoryRouter(network)
        )
        for name in ("a", "b")
    ]
    for node in nodes:
        network.add(DIGEST, replace(node.peer, state=PeerState.INFLIGHT))
    ended: dict[int, float] = {}
    got: dict[int, int] = {}

    async def pull(i: int) -> None:
        async with nodes[i].client() as http:
            async with http.stream("GET", PATH) as response:
                assert response.status_code == 200
                got[i] = 0
                with pytest.raises(httpx.RemoteProtocolError):
                    async for chunk in response.aiter_bytes():
                        got[i] += len(chunk)
        ended[i] = trio.current_time()

    started = trio.current_time()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(2):
                nursery.start_soon(pull, i)
    assert all(0 < got[i] < len(CONTENT) for i in range(2)), got
    assert max(ended.values()) - started < 5.0, ended
