"""Concurrent GETs of one blob on one node share one peer fetch (real loopback sockets).

The provider is a scripted peer that sends its head, then the body a while later, so every
request arrives while the one fetch is in flight; each client must still get its own bytes
(Range included), and the provider must see exactly one request.
"""

from __future__ import annotations

import httpx
import pytest
import trio
import trio.testing

from registry.mirror.job import MirrorSettings
from registry.serve.app import RegistrySettings
from tests.fakes import MemoryContentStore, MemoryNetwork
from tests.registry.conftest import (
    LOOPBACK,
    SERVERS,
    Node,
    ScriptedPeer,
    StartNode,
    StartScripted,
    fill,
)

SETTINGS = RegistrySettings(
    mirror=MirrorSettings(resolve_timeout=0.5, response_timeout=2.0, stall_timeout=5.0)
)
RANGES = [None, "bytes=0-0", "bytes=100-4095", "bytes=5000-", "bytes=-10", None, "bytes=1-1", None]


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0.02)


def expected(body: bytes, spec: str | None) -> tuple[int, bytes]:
    if spec is None:
        return 200, body
    first, last = spec.removeprefix("bytes=").split("-")
    if not first:
        return 206, body[-int(last) :]
    end = len(body) - 1 if not last else int(last)
    return 206, body[int(first) : end + 1]


async def get(node: Node, path: str, spec: str | None) -> httpx.Response:
    headers = {"Accept": "application/vnd.oci.image.layer.v1.tar+gzip, */*"}
    if spec is not None:
        headers["Range"] = spec
    async with node.client() as http:
        return await http.get(path, headers=headers)


async def slow_provider(
    start_node: StartNode, network: MemoryNetwork, start_scripted: StartScripted
) -> tuple[bytes, ScriptedPeer, Node, str]:
    """A node whose one provider of a layer sends its head, then the body 0.5 s later: the
    layer's bytes, the provider, the node and the layer's path."""
    content = fill(MemoryContentStore())
    body = content.layer_bytes
    late = await start_scripted(ScriptedPeer("late", body, content.layer, pause=0.5))
    network.add(content.layer, late.peer)
    node = await start_node(settings=SETTINGS)
    return body, late, node, f"/v2/library/app/blobs/{content.layer}?ns=docker.io"


async def many_at_once(node: Node, path: str) -> list[httpx.Response]:
    answers: list[httpx.Response | None] = [None] * len(RANGES)

    async def one(i: int, spec: str | None) -> None:
        answers[i] = await get(node, path, spec)

    async with trio.open_nursery() as nursery:
        for i, spec in enumerate(RANGES):
            nursery.start_soon(one, i, spec)
    return [a for a in answers if a is not None]


@pytest.mark.parametrize("registry_server", SERVERS)
async def test_concurrent_gets_of_one_blob_make_one_peer_transfer(
    clock: trio.testing.MockClock,
    start_node: StartNode,
    network: MemoryNetwork,
    start_scripted: StartScripted,
) -> None:
    body, late, node, path = await slow_provider(start_node, network, start_scripted)
    answers = await many_at_once(node, path)
    assert len(answers) == len(RANGES)
    for spec, answer in zip(RANGES, answers, strict=True):
        status, data = expected(body, spec)
        assert (answer.status_code, spec) == (status, spec)
        assert answer.content == data, spec
        assert answer.headers["content-length"] == str(len(data))
    assert len(late.requests) == 1  # one transfer of the whole blob for all of them
    assert "range" not in late.requests[0][2]
    assert len(node.registry.forwarder.shares) == 0  # nothing left open


async def test_a_client_that_leaves_does_not_cut_the_others(
    clock: trio.testing.MockClock,
    start_node: StartNode,
    network: MemoryNetwork,
    start_scripted: StartScripted,
) -> None:
    body, late, node, path = await slow_provider(start_node, network, start_scripted)
    got: list[httpx.Response] = []

    async def stays() -> None:
        got.append(await get(node, path, None))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stays)
        with trio.move_on_after(0.2):  # the first client gives up before the body comes
            await get(node, path, None)
        nursery.start_soon(stays)
    assert [(r.status_code, r.content == body) for r in got] == [(200, True), (200, True)]
    assert len(late.requests) == 1


async def test_a_miss_is_shared_too(
    clock: trio.testing.MockClock, start_node: StartNode, start_scripted: StartScripted
) -> None:
    """With no provider, every concurrent request gets the one fetch's 404."""
    content = fill(MemoryContentStore())
    node = await start_node(settings=SETTINGS)
    path = f"/v2/library/app/blobs/{content.layer}?ns=docker.io"
    answers = await many_at_once(node, path)
    assert {a.status_code for a in answers} == {404}
    assert all(a.json()["errors"][0]["code"] == "BLOB_UNKNOWN" for a in answers)


@pytest.mark.parametrize("registry_server", SERVERS)
@pytest.mark.parametrize("spec", [None, "bytes=-1"])
async def test_a_client_that_leaves_mid_mirror_stops_the_fetch_at_once(
    clock: trio.testing.MockClock,
    start_node: StartNode,
    network: MemoryNetwork,
    start_scripted: StartScripted,
    spec: str | None,
) -> None:
    """The only client of a mirrored blob closes its connection while the peer's body is still
    due (with `bytes=-1` no byte was due to it yet: the blob is verified first): the peer fetch
    is cancelled at once, not after the stall bound, on either server."""
    content = fill(MemoryContentStore())
    mute = await start_scripted(ScriptedPeer("mute", content.layer_bytes, content.layer, cut=10))
    network.add(content.layer, mute.peer)
    node = await start_node(settings=SETTINGS)
    path = f"/v2/library/app/blobs/{content.layer}?ns=docker.io"
    ranged = "" if spec is None else f"Range: {spec}\r\n"
    stream = await trio.open_tcp_stream(LOOPBACK, node.port)
    await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n{ranged}\r\n".encode())
    with trio.fail_after(1):  # hang guard: the peer is asked at once
        while not mute.requests:  # noqa: ASYNC110 - a scripted peer's record
            await trio.sleep(0.01)
    await stream.aclose()
    with trio.fail_after(SETTINGS.mirror.stall_timeout / 2):  # MockClock: well before the bound
        await mute.hung_up.wait()


@pytest.mark.parametrize("registry_server", SERVERS)
async def test_blob_gets_read_the_shared_fetch_without_a_task_of_their_own(
    clock: trio.testing.MockClock,
    start_node: StartNode,
    network: MemoryNetwork,
    start_scripted: StartScripted,
) -> None:
    """While the fetch is in flight, the registry's task tree holds the one shared fetch and no
    fetch or relay task per request: each response pulls its items itself."""
    _, _, node, path = await slow_provider(start_node, network, start_scripted)
    seen: list[str] = []

    async def look() -> None:
        await trio.sleep(0.3)  # every request is waiting for the paused peer
        nursery = node.registry._nursery
        assert nursery is not None
        seen.extend(task.name.rsplit(".", 1)[-1] for task in nursery.child_tasks)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(look)
        answers = await many_at_once(node, path)
    assert all(a.status_code in (200, 206) for a in answers)
    assert seen.count("_fetch_shared") == 1, seen
    assert "_fetch" not in seen, seen  # Registry._fetch: a request's own fetch task
