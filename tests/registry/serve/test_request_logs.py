"""What the registry reports per request: the INFO mirror outcome line (read by `make demo`), the
same facts as a `MirrorOutcome` event (the debug page's source), and Spegel's DEBUG access line,
for app-served and sendfile-served requests."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from agent.observability.debug import DebugState
from registry.events import MirrorEvent, MirrorEvents, MirrorOutcome, TransferProgress
from registry.mirror.job import MirrorSettings
from registry.serve.app import RegistrySettings
from registry.serve.server import ServerKind
from tests.fakes import MemoryContentStore, MemoryNetwork
from tests.registry.conftest import SERVERS, Content, Node, StartNode, fill, with_key

FAST = with_key(
    RegistrySettings(
        mirror=MirrorSettings(resolve_timeout=0.5, response_timeout=1.0, stall_timeout=1.0)
    )
)
MISSING = "sha256:" + "e" * 64


async def provider_and_client(
    start_node: StartNode, network: MemoryNetwork, files: Path, events: MirrorEvents | None = None
) -> tuple[Node, Content, Node]:
    """A provider holding a file-backed image (so its blobs go out by sendfile) and a client."""
    store = MemoryContentStore()
    content = fill(store, files=files)
    provider = await start_node(store, settings=with_key())
    for key in (content.layer, content.manifest, content.tag_key):
        network.add(key, provider.peer)
    return provider, content, await start_node(settings=FAST, events=events)


def mirror_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name == "registry.mirror.forwarder" and hasattr(r, "cache")
    ]


def access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "registry.access"]


async def wait_for(caplog: pytest.LogCaptureFixture, count: int) -> list[logging.LogRecord]:
    """Access lines are written once the response is done, possibly just after the client has it."""
    for _ in range(500):  # at most ~5 s
        if len(access_lines(caplog)) >= count:
            break
        await trio.sleep(0.01)
    return access_lines(caplog)


async def test_mirror_hit_and_miss_lines(
    start_node: StartNode, network: MemoryNetwork, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="registry")
    events = MirrorEvents()
    outcomes: list[MirrorEvent] = []
    events.subscribe(outcomes.append)
    provider, content, client = await provider_and_client(start_node, network, tmp_path, events)
    state = DebugState()
    events.subscribe(state.on_mirror_event)
    async with client.client() as http:
        hit = await http.get(f"/v2/library/app/blobs/{content.layer}?ns=docker.io")
        tag = await http.head("/v2/library/app/manifests/v1?ns=docker.io")
        miss = await http.get(f"/v2/library/app/blobs/{MISSING}?ns=docker.io")
    assert (hit.status_code, tag.status_code, miss.status_code) == (200, 200, 404)
    blob, head, missed = mirror_lines(caplog)
    assert blob.levelno == logging.INFO and blob.getMessage() == "mirror hit"
    assert (
        vars(blob).items()
        >= {
            "cache": "hit",
            "key": content.layer,
            "peer": f"127.0.0.1:{provider.port}",
            "registry": "docker.io",
            "method": "GET",
            "bytes": len(content.layer_bytes),
            "attempts": 1,
        }.items()
    )
    assert isinstance(blob.duration_ms, float) and blob.duration_ms >= 0
    assert not hasattr(blob, "reason")
    assert (head.key, head.bytes, head.cache) == (content.tag_key, 0, "hit")
    assert missed.levelno == logging.INFO and missed.cache == "miss"
    assert (missed.key, missed.peer, missed.bytes, missed.attempts) == (MISSING, None, 0, 0)
    assert "could not find peer" in missed.reason and missed.reason in missed.getMessage()
    # the events carry the same facts as the lines; the debug page shows them (newest first)
    ends = [o for o in outcomes if isinstance(o, MirrorOutcome)]
    progress = [o for o in outcomes if isinstance(o, TransferProgress)]
    assert len(ends) == len(outcomes) - len(progress) == 3
    assert [(o.key, o.hit, o.peer, o.bytes, o.duration_ms, o.reason) for o in ends] == [
        (r.key, r.cache == "hit", r.peer, r.bytes, r.duration_ms, getattr(r, "reason", ""))
        for r in (blob, head, missed)
    ]
    assert [(r.outcome, r.key, r.peer) for r in state.results] == [
        ("miss", MISSING, ""),
        ("hit", content.tag_key, f"127.0.0.1:{provider.port}"),
        ("hit", content.layer, f"127.0.0.1:{provider.port}"),
    ]
    assert state.results[2].duration_ms == blob.duration_ms


async def test_a_blob_from_a_peer_is_a_transfer_with_progress(
    start_node: StartNode, network: MemoryNetwork, tmp_path: Path
) -> None:
    """Start (0 bytes of the known size), progress, end (every byte, done); the debug state shows
    it while it runs and drops it at the end. Manifests and HEADs are not transfers."""
    events = MirrorEvents()
    seen: list[TransferProgress] = []
    events.subscribe(lambda e: seen.append(e) if isinstance(e, TransferProgress) else None)
    provider, content, client = await provider_and_client(start_node, network, tmp_path, events)
    state = DebugState()
    running: list[int] = []

    def observe(event: MirrorEvent) -> None:
        state.on_mirror_event(event)
        if isinstance(event, TransferProgress) and event.state == "running":
            running.append(len(state.live.transfers()))

    events.subscribe(observe)
    async with client.client() as http:
        assert (await http.get(f"/v2/library/app/blobs/{content.layer}?ns=docker.io")).is_success
        assert (await http.head(f"/v2/library/app/blobs/{content.layer}?ns=docker.io")).is_success
        assert (await http.get("/v2/library/app/manifests/v1?ns=docker.io")).is_success
    size = len(content.layer_bytes)
    assert seen[0].state == "running" and (seen[0].bytes, seen[0].total) == (0, size)
    assert (seen[-1].state, seen[-1].bytes, seen[-1].total) == ("done", size, size)
    assert {e.id for e in seen} == {seen[0].id} and all(e.key == content.layer for e in seen)
    assert seen[0].peer == f"127.0.0.1:{provider.port}" and seen[0].source == "complete"
    assert [e.bytes for e in seen] == sorted(e.bytes for e in seen)
    assert running and all(n == 1 for n in running)
    assert state.live.transfers() == [] and state.live.finished()[-1]["state"] == "done"


@pytest.mark.parametrize("registry_server", SERVERS)
async def test_a_blob_served_to_a_peer_from_disk_is_an_outgoing_transfer(
    start_node: StartNode, network: MemoryNetwork, tmp_path: Path, registry_server: ServerKind
) -> None:
    store = MemoryContentStore()
    content = fill(store, files=tmp_path)
    events = MirrorEvents()
    seen: list[TransferProgress] = []
    events.subscribe(lambda e: seen.append(e) if isinstance(e, TransferProgress) else None)
    provider = await start_node(store, events=events)
    state = DebugState()
    events.subscribe(state.on_mirror_event)
    network.add(content.layer, provider.peer)
    client = await start_node(settings=FAST)
    async with client.client() as http:
        assert (await http.get(f"/v2/library/app/blobs/{content.layer}?ns=docker.io")).is_success
    size = len(content.layer_bytes)
    # by the server's zero-copy extension on ours, streamed on Hypercorn: reported alike
    assert provider.stats.served == (1 if registry_server == "h11" else 0)
    ends = [(e.direction, e.state) for e in (seen[0], seen[-1])]
    assert ends == [("out", "running"), ("out", "done")]
    assert (seen[0].bytes, seen[-1].bytes, seen[-1].total) == (0, size, size)
    assert seen[-1].peer == "127.0.0.1" and seen[-1].key == content.layer
    assert {p["peer"]: p["bytes_out"] for p in state.live.peer_traffic()} == {"127.0.0.1": size}


@pytest.mark.parametrize("registry_server", SERVERS)
async def test_access_lines_for_app_and_sendfile_requests(
    start_node: StartNode,
    network: MemoryNetwork,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    registry_server: ServerKind,
) -> None:
    caplog.set_level(logging.DEBUG, logger="registry.access")
    provider, content, client = await provider_and_client(start_node, network, tmp_path)
    served_before = provider.stats.served
    async with client.client() as http:
        assert (await http.get("/readyz")).status_code == 200  # probes are not logged
        response = await http.get(
            f"/v2/library/app/blobs/{content.layer}?ns=docker.io",
            headers={"X-Forwarded-For": "10.9.8.7, 10.0.0.1"},
        )
        assert response.status_code == 200
    lines = await wait_for(caplog, 2)
    zero_copy = 1 if registry_server == "h11" else 0  # only our server offers the extension
    assert provider.stats.served == served_before + zero_copy
    by_handler = {r.handler: r for r in lines}
    assert sorted(by_handler) == ["blob", "mirror"]
    served, mirrored = by_handler["blob"], by_handler["mirror"]
    path = f"/v2/library/app/blobs/{content.layer}"
    assert (
        vars(served).items()
        >= {
            "path": path,
            "status": 200,
            "method": "GET",
            "ip": "127.0.0.1",  # the client node's own connection to its peer
            "registry": "docker.io",
            "bytes": len(content.layer_bytes),
        }.items()
    )
    assert (
        vars(mirrored).items()
        >= {
            "path": path,
            "status": 200,
            "method": "GET",
            "ip": "127.0.0.1",  # X-Forwarded-For is ignored without --trusted-proxies
            "registry": "docker.io",
            "bytes": len(content.layer_bytes),
        }.items()
    )
    assert all(r.levelno == logging.DEBUG and r.latency >= 0 for r in lines)
    # app-served local content and the API check: handler names as Spegel's
    async with provider.client() as http:
        await http.get(f"/v2/library/app/manifests/{content.manifest}?ns=docker.io")
        await http.get("/v2/")
    lines = await wait_for(caplog, 4)
    assert [(r.handler, r.status, r.ip) for r in lines[2:]] == [
        ("manifest", 200, "127.0.0.1"),
        ("v2", 200, "127.0.0.1"),
    ]


async def test_no_access_lines_below_debug(
    start_node: StartNode, network: MemoryNetwork, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # the agent opens `registry` to DEBUG for the debug page; the access logger keeps its level
    caplog.set_level(logging.DEBUG, logger="registry")
    caplog.set_level(logging.INFO, logger="registry.access")
    _, content, client = await provider_and_client(start_node, network, tmp_path)
    async with client.client() as http:
        response = await http.get(f"/v2/library/app/blobs/{content.layer}?ns=docker.io")
        assert response.status_code == 200
    await trio.sleep(0.05)
    assert access_lines(caplog) == []
    assert [r.cache for r in mirror_lines(caplog)] == ["hit"]
