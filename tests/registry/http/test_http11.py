"""The registry server's one HTTP/1.1 parser (h11) through a real socket: legal odd forms get a
correct answer, malformed requests a 4xx and a closed connection (never silence, never a 5xx)."""

from __future__ import annotations

import functools
import socket
from pathlib import Path

import h11
import pytest
import trio

from registry.http.asgi import split_target
from registry.http.connection import (
    BULK_NOTSENT_LOWAT,
    MAX_BODY,
    MAX_HEAD,
    ClientGone,
    ServerConnection,
)
from registry.serve.app import Registry
from registry.serve.server import run_registry
from tests.fakes import MemoryContentStore, MemoryRouter
from tests.registry.conftest import Content, StartNode, fill


async def send_and_read(port: int, raw: bytes, *, half_close: bool = False) -> bytes:
    """Send `raw`, optionally half-close, and read until the agent closes the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(raw)
    if half_close:
        await stream.send_eof()
    answer = bytearray()
    with trio.fail_after(10):  # hang guard: the agent must close after these requests
        while data := await stream.receive_some(1 << 16):
            answer += data
    await stream.aclose()
    return bytes(answer)


def responses(answer: bytes, methods: list[str]) -> list[tuple[int, dict[str, str], bytes]]:
    """Parse the responses to requests made with `methods`, in order (h11 as the client)."""
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(answer)
    conn.receive_data(b"")
    parsed: list[tuple[int, dict[str, str], bytes]] = []
    for method in methods:
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        status, headers, body = 0, {}, bytearray()
        while True:
            event = conn.next_event()
            if isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"incomplete response: {event!r}")
        parsed.append((status, headers, bytes(body)))
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            break
        conn.start_next_cycle()
    return parsed


async def setup(start_node: StartNode, tmp_path: Path) -> tuple[Content, int]:
    store = MemoryContentStore()
    content = fill(store, files=tmp_path)
    node = await start_node(store)
    return content, node.port


async def test_bare_lf_line_ends_are_answered(start_node: StartNode, tmp_path: Path) -> None:
    content, port = await setup(start_node, tmp_path)
    raw = f"GET /v2/library/app/blobs/{content.layer}?ns=docker.io HTTP/1.1\nHost: x\n"
    raw += "Connection: close\n\n"
    [(status, _, body)] = responses(await send_and_read(port, raw.encode()), ["GET"])
    assert (status, body) == (200, content.layer_bytes)


@pytest.mark.parametrize("version", ["1.0", "1.1"])
async def test_half_closed_clients_get_their_answer(
    version: str, start_node: StartNode, tmp_path: Path
) -> None:
    content, port = await setup(start_node, tmp_path)
    blob = f"/v2/library/app/blobs/{content.layer}?ns=docker.io"
    manifest = f"/v2/library/app/manifests/{content.manifest}?ns=docker.io"
    raw = f"GET {blob} HTTP/{version}\r\nHost: x\r\n\r\n"
    methods = ["GET"]
    if version == "1.1":  # pipelined behind it: a manifest the app answers
        raw += f"HEAD {manifest} HTTP/1.1\r\nHost: x\r\n\r\n"
        methods.append("HEAD")
    answer = await send_and_read(port, raw.encode(), half_close=True)
    got = responses(answer, methods)
    assert [status for status, _, _ in got] == [200] * len(methods)
    assert got[0][2] == content.layer_bytes
    if version == "1.1":
        assert got[1][1]["content-length"] == str(len(content.manifest_bytes))


async def test_http_1_0_to_the_app(start_node: StartNode, tmp_path: Path) -> None:
    content, port = await setup(start_node, tmp_path)
    raw = f"GET /v2/library/app/manifests/{content.manifest}?ns=docker.io HTTP/1.0\r\n\r\n"
    [(status, _, body)] = responses(await send_and_read(port, raw.encode()), ["GET"])
    assert (status, body) == (200, content.manifest_bytes)


async def test_absolute_form_targets(start_node: StartNode, tmp_path: Path) -> None:
    content, port = await setup(start_node, tmp_path)
    raw = (
        f"GET http://x/v2/library/app/blobs/{content.layer}?ns=docker.io HTTP/1.1\r\n"
        "Host: x\r\n\r\n"
        f"GET http://x/v2/library/app/manifests/{content.manifest}?ns=docker.io HTTP/1.1\r\n"
        "Host: x\r\nConnection: close\r\n\r\n"
    )
    got = responses(await send_and_read(port, raw.encode()), ["GET", "GET"])
    assert [(status, body) for status, _, body in got] == [
        (200, content.layer_bytes),
        (200, content.manifest_bytes),
    ]


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /v2/ HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET /v2/ HTTP/1.1 extra\r\nHost: x\r\n\r\n", 400),
        (b"GET /v2/ HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", 400),
        (b"GET /v2/ HTTP/1.1\r\nHost: x\r\nBad Name: y\r\n\r\n", 400),
        (b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
        (b"GET /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400),  # h11: 501
        (b"GET /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"GET /v2/\x00 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 8 * MAX_HEAD + b"\r\n\r\n", 431),
        (
            b"POST /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1)
            + bytes(MAX_BODY + 1),
            413,
        ),
        (b"GET /v2/ HTTP/1.1\r\nHost: x\r\n", 400),  # half-closed before the head ended
        (b"HEAD %2Fv2%2F HTTP/1.1\r\nHost: x\r\n\r\n", 400),  # not a path: 400 without a body
    ],
)
async def test_malformed_requests_get_4xx_and_a_closed_connection(
    raw: bytes, status: int, start_node: StartNode
) -> None:
    node = await start_node()
    answer = await send_and_read(node.port, raw, half_close=True)
    head = raw.startswith(b"HEAD")
    [(got, headers, body)] = responses(answer, ["HEAD" if head else "GET"])
    assert (got, headers["connection"]) == (status, "close")
    assert head or body  # says what was wrong
    # the agent is fine: the next connection is served
    closing = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    [(got, _, _)] = responses(await send_and_read(node.port, closing), ["GET"])
    assert got == 200


async def test_a_malformed_request_after_good_ones_is_answered_in_order(
    start_node: StartNode, tmp_path: Path
) -> None:
    content, port = await setup(start_node, tmp_path)
    raw = (
        f"GET /v2/library/app/blobs/{content.config}?ns=docker.io HTTP/1.1\r\nHost: x\r\n\r\n"
        "GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n"
        "GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n"
        "GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n"  # after the 400: never read
    )
    got = responses(await send_and_read(port, raw.encode()), ["GET"] * 4)
    assert [status for status, _, _ in got] == [200, 200, 400]


async def test_request_bodies_are_read_and_the_connection_kept(start_node: StartNode) -> None:
    node = await start_node()
    raw = (
        b"POST /v2/a/blobs/uploads/ HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        b"PUT /v2/a/blobs/uploads/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n"
        b"PATCH /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\nhi"
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    answer = await send_and_read(node.port, raw)
    got = responses(answer, ["POST", "PUT", "PATCH", "GET"])
    assert [status for status, _, _ in got] == [404, 404, 404, 200]


async def test_a_head_must_complete_within_the_head_timeout(
    nursery: trio.Nursery,
) -> None:
    registry = Registry(MemoryContentStore(), MemoryRouter())
    port = await nursery.start(
        functools.partial(run_registry, registry, "127.0.0.1", 0, head_timeout=0.5)
    )
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(5):  # hang guard
        for byte in b"GET /v2/ HTTP/1.1\r\nHost: x":  # one byte every 0.1 s never completes
            try:
                await stream.send_all(bytes([byte]))
            except trio.BrokenResourceError:
                break
            await trio.sleep(0.1)
        assert await stream.receive_some(10) == b""


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/v2/a/blobs/x?ns=docker.io", ("/v2/a/blobs/x", b"/v2/a/blobs/x", b"ns=docker.io")),
        (b"/v2/a%2Fb/", ("/v2/a/b/", b"/v2/a%2Fb/", b"")),
        (b"http://host:5000/v2/?ns=x", ("/v2/", b"/v2/", b"ns=x")),
        (b"http://host", ("/", b"/", b"")),
        (b"*", ("*", b"*", b"")),
    ],
)
def test_split_target(target: bytes, expected: tuple[str, bytes, bytes]) -> None:
    assert split_target(target) == expected


async def _connection_pair() -> tuple[ServerConnection, trio.SocketStream]:
    server_sock, client_sock = trio.socket.socketpair()
    conn = ServerConnection(trio.SocketStream(server_sock), head_timeout=5, idle_timeout=5)
    return conn, trio.SocketStream(client_sock)


async def _request(conn: ServerConnection, client: trio.SocketStream) -> None:
    await client.send_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await conn.next_request() is not None


@pytest.mark.parametrize("length", [None, 3 * 1024 * 1024 + 7])
async def test_a_big_body_piece_goes_out_whole_to_a_slow_reader(length: int | None) -> None:
    # pieces bigger than the socket buffers take the direct write path and wait for room
    pieces = [bytes([i]) * (1024 * 1024 + i) for i in range(3)] + [b"x" * 4]
    body = b"".join(pieces)
    conn, client = await _connection_pair()
    await _request(conn, client)
    headers = [(b"content-length", str(len(body)).encode())] if length else []
    received = bytearray()

    async def read_slowly() -> None:
        while data := await client.receive_some(32 * 1024):
            received.extend(data)
            await trio.lowlevel.checkpoint()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_slowly)
            await conn.send_bytes(conn.response_head(200, headers))
            for piece in pieces:
                with memoryview(piece) as view:
                    await conn.send_view(view)
            await conn.send_bytes(conn.end_bytes())
            await conn.stream.send_eof()
    [(status, _, answer)] = responses(bytes(received), ["GET"])
    assert (status, answer) == (200, body)


async def test_a_client_gone_during_a_big_body_piece_is_client_gone() -> None:
    conn, client = await _connection_pair()
    await _request(conn, client)
    body = b"y" * (8 * 1024 * 1024)
    await conn.send_bytes(conn.response_head(200, [(b"content-length", str(len(body)).encode())]))
    await client.aclose()
    with trio.fail_after(10), pytest.raises(ClientGone):
        await conn.send_view(memoryview(body))


@pytest.mark.skipif(not hasattr(socket, "TCP_NOTSENT_LOWAT"), reason="Linux TCP option")
async def test_a_big_body_lifts_trios_not_sent_mark_and_arrives_whole() -> None:
    # trio keeps at most 16 KiB unsent per TCP stream; for a bulk body the kernel would then take
    # ~190 KiB per write.  Small answers leave the mark alone; the first big piece lifts it.
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    conn = ServerConnection(await listener.accept(), head_timeout=5, idle_timeout=5)

    def mark() -> int:
        return conn.stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)

    small, big = b"s" * 100, bytes(range(256)) * (12 * 1024)  # 3 MiB
    received = bytearray()

    async def read_all() -> None:
        while data := await client.receive_some(1 << 20):
            received.extend(data)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            for body in (small, big):
                await _request(conn, client)
                length = str(len(body)).encode()
                await conn.send_bytes(conn.response_head(200, [(b"content-length", length)]))
                before = mark()
                await conn.send_view(memoryview(body))
                await conn.send_bytes(conn.end_bytes())
                assert conn.next_cycle()
                if body is small:
                    assert mark() == before < BULK_NOTSENT_LOWAT
            assert mark() == BULK_NOTSENT_LOWAT
            await conn.stream.send_eof()
    answers = responses(bytes(received), ["GET", "GET"])
    assert [(status, answer) for status, _, answer in answers] == [(200, small), (200, big)]
    await client.aclose()
    await conn.stream.aclose()
    await listener.aclose()
