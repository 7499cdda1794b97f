"""The registry app on our h11 server: file bodies by zero-copy sends mixed with other answers on
keep-alive connections, pipelining, disconnects, shutdown, a failing store."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import h11
import trio

from registry.http.client import PeerClient
from registry.serve.app import Registry
from registry.serve.connection import AnswerStats
from registry.serve.server import run_registry
from tests.fakes import MemoryContentStore, MemoryRouter
from tests.registry.conftest import Content, StartNode, fill


async def exchange(
    stream: trio.SocketStream,
    conn: h11.Connection,
    target: str,
    method: str = "GET",
    headers: tuple[tuple[str, str], ...] = (),
) -> tuple[int, dict[str, str], bytes]:
    request = h11.Request(method=method, target=target, headers=[("Host", "x"), *headers])
    await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
    status, response_headers, body = 0, {}, bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(1 << 20))
        elif isinstance(event, h11.Response):
            status = event.status_code
            response_headers = {k.decode(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            conn.start_next_cycle()
            return status, response_headers, bytes(body)


def passed_on(stats: AnswerStats) -> int:
    """Answers with neither a zero-copy body nor a mirror (manifests, errors, /v2/)."""
    return stats.answered - stats.served - stats.mirrored


async def setup(start_node: StartNode, tmp_path: Path) -> tuple[Content, int, AnswerStats]:
    store = MemoryContentStore()
    content = fill(store, files=tmp_path)
    node = await start_node(store)
    return content, node.port, node.stats


async def test_keep_alive_mixes_sendfile_and_app(start_node: StartNode, tmp_path: Path) -> None:
    content, port, stats = await setup(start_node, tmp_path)
    blob = f"/v2/library/app/blobs/{content.layer}?ns=docker.io"
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    for _ in range(3):
        status, _, body = await exchange(stream, conn, blob)
        assert (status, body) == (200, content.layer_bytes)
    status, headers, _ = await exchange(stream, conn, blob, "HEAD")
    assert (status, headers["content-length"]) == (200, str(len(content.layer_bytes)))
    status, headers, body = await exchange(stream, conn, blob, headers=(("Range", "bytes=-4"),))
    assert (status, body, headers["content-range"]) == (
        206,
        b"tail",
        f"bytes {len(content.layer_bytes) - 4}-{len(content.layer_bytes) - 1}/"
        f"{len(content.layer_bytes)}",
    )
    assert (stats.served, passed_on(stats)) == (5, 0)
    # a manifest (body messages, then the connection comes back) and a blob miss (the mirror
    # path answers it with a 404)
    status, _, body = await exchange(
        stream, conn, f"/v2/library/app/manifests/{content.manifest}?ns=docker.io"
    )
    assert (status, body) == (200, content.manifest_bytes)
    status, _, _ = await exchange(stream, conn, f"/v2/x/blobs/{'sha256:' + '0' * 64}?ns=x.io")
    assert status == 404
    status, headers, _ = await exchange(
        stream, conn, f"/v2/library/app/manifests/{content.manifest}?ns=docker.io", "HEAD"
    )
    assert (status, headers["content-length"]) == (200, str(len(content.manifest_bytes)))
    status, _, body = await exchange(stream, conn, blob)
    assert (status, body) == (200, content.layer_bytes)
    assert (stats.served, stats.mirrored, passed_on(stats)) == (6, 1, 2)
    await stream.aclose()


async def test_pipelined_requests(start_node: StartNode, tmp_path: Path) -> None:
    content, port, stats = await setup(start_node, tmp_path)
    blob = f"/v2/library/app/blobs/{content.config}?ns=docker.io"
    raw = f"GET {blob} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(raw * 2 + b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    responses = 0
    while responses < 3:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(1 << 16))
        elif isinstance(event, h11.Response):
            assert event.status_code == 200
        elif isinstance(event, h11.EndOfMessage):
            responses += 1
            conn.start_next_cycle()
            conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
            conn.send(h11.EndOfMessage())
    assert (stats.served, passed_on(stats)) == (2, 1)
    await stream.aclose()


async def test_client_gone_midway_does_not_hurt(start_node: StartNode, tmp_path: Path) -> None:
    store = MemoryContentStore()
    big = tmp_path / "big"
    big.write_bytes(b"\x1f\x8b" + bytes(32 << 20))
    digest = store.add_file(big)
    node = await start_node(store)
    for _ in range(3):
        stream = await trio.open_tcp_stream("127.0.0.1", node.port)
        await stream.send_all(
            f"GET /v2/a/blobs/{digest}?ns=x.io HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        await stream.receive_some(1 << 16)
        await stream.aclose()
    stream = await trio.open_tcp_stream("127.0.0.1", node.port)
    status, _, _ = await exchange(
        stream, h11.Connection(h11.CLIENT), f"/v2/a/blobs/{digest}?ns=x.io", "HEAD"
    )
    assert status == 200
    await stream.aclose()


async def test_shutdown_closes_idle_keep_alive_connections(tmp_path: Path) -> None:
    store = MemoryContentStore()
    content = fill(store, files=tmp_path)
    registry = Registry(store, MemoryRouter())
    stop = trio.Event()
    with trio.fail_after(5):  # a hang guard, not a timing assertion
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                functools.partial(
                    run_registry,
                    registry,
                    "127.0.0.1",
                    0,
                    shutdown_trigger=stop.wait,
                    graceful_timeout=0.5,
                )
            )
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            conn = h11.Connection(h11.CLIENT)
            status, _, _ = await exchange(
                stream, conn, f"/v2/library/app/blobs/{content.config}?ns=docker.io"
            )
            assert status == 200
            handed = await trio.open_tcp_stream("127.0.0.1", port)
            status, _, _ = await exchange(handed, h11.Connection(h11.CLIENT), "/v2/")
            assert status == 200
            stop.set()
        assert await stream.receive_some(10) == b""
        assert await handed.receive_some(10) == b""


async def test_content_gone_before_sending_is_a_404(start_node: StartNode, tmp_path: Path) -> None:
    """The store still describes the blob, but its file vanished before the body was opened:
    a clean 404 BLOB_UNKNOWN (containerd asks the next host), the connection kept."""
    content, port, stats = await setup(start_node, tmp_path)
    (tmp_path / content.layer.removeprefix("sha256:")).unlink()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    target = f"/v2/library/app/blobs/{content.layer}?ns=docker.io"
    with trio.fail_after(5):  # hang guard
        status, headers, body = await exchange(stream, conn, target)
    assert status == 404 and b"BLOB_UNKNOWN" in body
    assert headers["content-length"] == str(len(body))
    assert (stats.served, passed_on(stats)) == (0, 1)
    status, _, _ = await exchange(stream, conn, "/v2/")
    assert status == 200


async def test_slow_heads_are_cut_off(nursery: trio.Nursery, tmp_path: Path) -> None:
    registry = Registry(MemoryContentStore(), MemoryRouter())
    port = await nursery.start(
        functools.partial(run_registry, registry, "127.0.0.1", 0, head_timeout=0.2)
    )
    slow = await trio.open_tcp_stream("127.0.0.1", port)
    await slow.send_all(b"GET /v2/ HTTP/1.1\r\nHost")
    with trio.fail_after(5):  # hang guard
        assert await slow.receive_some(10) == b""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    status, _, _ = await exchange(stream, h11.Connection(h11.CLIENT), "/v2/")
    assert status == 200


class ExplodingStore(MemoryContentStore):
    def open(self, digest: str) -> Any:
        raise RuntimeError("store exploded")  # neither OSError nor ContentNotFound


async def test_a_failing_store_costs_one_connection_at_most(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    store = ExplodingStore()
    content = fill(store, files=tmp_path)
    registry = Registry(store, MemoryRouter())
    port = await nursery.start(functools.partial(run_registry, registry, "127.0.0.1", 0))
    for _ in range(2):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        target = f"/v2/library/app/blobs/{content.layer}?ns=docker.io"
        await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        with trio.fail_after(5):  # hang guard
            reply = await stream.receive_some(1 << 16)
        assert reply == b"" or reply.startswith(b"HTTP/1.1 500 ")
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    status, _, _ = await exchange(stream, h11.Connection(h11.CLIENT), "/v2/")
    assert status == 200


async def test_peer_client_keeps_blob_connections_apart(
    start_node: StartNode, tmp_path: Path
) -> None:
    content, port, stats = await setup(start_node, tmp_path)
    client = PeerClient()
    for target in (
        f"/v2/library/app/manifests/{content.manifest}?ns=docker.io",
        f"/v2/library/app/blobs/{content.config}?ns=docker.io",
        f"/v2/library/app/manifests/{content.manifest}?ns=docker.io",
        f"/v2/library/app/blobs/{content.layer}?ns=docker.io",
    ):
        async with client.request("127.0.0.1", port, "GET", target) as response:
            assert response.status == 200
            while await response.receive() is not None:
                pass
    lanes = {lane: len(conns) for (_, _, lane), conns in client._idle.items()}
    assert lanes == {"blobs": 1, "other": 1}  # one kept-alive connection per lane
    await client.aclose()
    assert (stats.served, passed_on(stats)) == (2, 2)
