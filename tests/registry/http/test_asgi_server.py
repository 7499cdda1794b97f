"""The generic ASGI server (registry.http.server) on its own, with tiny ASGI apps written here
(no registry): body buffers sent without copies and reusable once `send` returns, the
zerocopysend and pathsend extensions, HEAD, `http.disconnect` when the client leaves, the
lifespan protocol, 500s and cut responses for failing apps.  Real loopback sockets."""

from __future__ import annotations

import email.utils
import functools
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.lowlevel

from registry.http.asgi import EXTENSIONS, split_target
from registry.http.connection import DIRECT_SEND_MIN, ServerConnection
from registry.http.server import serve_asgi

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Handler = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK = "127.0.0.1"


def app_of(handler: Handler) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """An ASGI app answering every http request with `handler`; lifespan: not supported."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise RuntimeError("no lifespan here")
        await handler(scope, receive, send)

    return app


async def start(
    nursery: trio.Nursery, app: Callable[..., Awaitable[None]], **options: Any
) -> tuple[int, trio.Event]:
    """Serve `app` on loopback; (port, the event that shuts the server down)."""
    stop = trio.Event()
    port: int = await nursery.start(
        functools.partial(serve_asgi, app, LOOPBACK, 0, shutdown_trigger=stop.wait, **options)
    )
    return port, stop


async def exchange(port: int, raw: bytes) -> bytes:
    """Send `raw` on a new connection; everything the server sent until it closed."""
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    async with stream:
        await stream.send_all(raw)
        answer = bytearray()
        with trio.fail_after(10):  # hang guard
            while data := await stream.receive_some(1 << 16):
                answer += data
    return bytes(answer)


def parse(answer: bytes, methods: list[str]) -> list[tuple[int, dict[str, str], bytes, bool]]:
    """(status, headers, body, complete) of each response to requests made with `methods`."""
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(answer)
    conn.receive_data(b"")
    parsed = []
    for method in methods:
        if conn.our_state is h11.DONE:
            conn.start_next_cycle()
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        status, headers, body, complete = 0, {}, bytearray(), False
        try:
            while True:
                event = conn.next_event()
                if isinstance(event, h11.Response):
                    status = event.status_code
                    headers = {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    complete = True
                    break
                else:
                    break
        except h11.RemoteProtocolError:
            pass  # a body cut short
        parsed.append((status, headers, bytes(body), complete))
    return parsed


def get(path: str = "/", method: str = "GET", *, close: bool = True) -> bytes:
    extra = "Connection: close\r\n" if close else ""
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


async def start_response(send: Send, status: int = 200, length: int | None = None) -> None:
    headers = [] if length is None else [(b"content-length", str(length).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})


# --- the scope ------------------------------------------------------------------------------


async def test_scope_as_hypercorn_gives_it_with_our_extensions(nursery: trio.Nursery) -> None:
    scopes: list[Scope] = []

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        scopes.append(scope)
        body = (await receive())["body"]
        await start_response(send, length=len(body))
        await send({"type": "http.response.body", "body": body})

    port, _ = await start(nursery, app_of(handler))
    raw = b"POST /v2/a%2Fb/x?ns=docker.io HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    answer = await exchange(port, raw + b"Connection: close\r\n\r\nhello")
    assert parse(answer, ["POST"])[0][::2] == (200, b"hello")
    [scope] = scopes
    assert scope["method"] == "POST" and scope["http_version"] == "1.1"
    assert (scope["path"], scope["raw_path"], scope["query_string"]) == (
        "/v2/a/b/x",
        b"/v2/a%2Fb/x",
        b"ns=docker.io",
    )
    assert scope["client"][0] == LOOPBACK and scope["server"] == (LOOPBACK, port)
    assert (
        set(scope["extensions"])
        == set(EXTENSIONS)
        == {
            "http.response.pathsend",
            "http.response.zerocopysend",
        }
    )
    assert (b"host", b"x") in scope["headers"]
    date = parse(answer, ["POST"])[0][1]["date"]  # the server's Date header, RFC 9110 form
    assert email.utils.format_datetime(email.utils.parsedate_to_datetime(date), True) == date


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/v2/a/blobs/x?ns=docker.io", ("/v2/a/blobs/x", b"/v2/a/blobs/x", b"ns=docker.io")),
        (b"/v2/caf%C3%A9/", ("/v2/café/", b"/v2/caf%C3%A9/", b"")),
        (b"http://host:5000/v2/?ns=x", ("/v2/", b"/v2/", b"ns=x")),
        (b"http://host", ("/", b"/", b"")),
        (b"*", ("*", b"*", b"")),
    ],
)
def test_split_target(target: bytes, expected: tuple[str, bytes, bytes]) -> None:
    assert split_target(target) == expected


# --- bodies ---------------------------------------------------------------------------------

PIECES = 4


@pytest.mark.parametrize("size", [1000, 4 * DIRECT_SEND_MIN])
async def test_a_body_buffer_may_be_reused_as_soon_as_send_returns(
    nursery: trio.Nursery, size: int
) -> None:
    """The app fills one bytearray, sends a view of it, and overwrites it right after `send`:
    the client gets every piece as it was when sent, in order."""

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        await start_response(send, length=size * PIECES)
        buffer = bytearray(size)
        for i in range(PIECES):
            buffer[:] = bytes([ord("a") + i]) * size
            await send(
                {"type": "http.response.body", "body": memoryview(buffer), "more_body": True}
            )
            buffer[:] = b"X" * size  # reused at once: the bytes sent must not change
        await send({"type": "http.response.body", "body": b""})

    port, _ = await start(nursery, app_of(handler))
    [(status, _, body, complete)] = parse(await exchange(port, get()), ["GET"])
    assert (status, complete) == (200, True)
    assert body == b"".join(bytes([ord("a") + i]) * size for i in range(PIECES))


async def test_big_body_pieces_go_to_the_socket_from_the_apps_own_buffer(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    buffer = bytearray(b"z" * (2 * DIRECT_SEND_MIN))
    written_from: list[bool] = []
    direct = ServerConnection._send_direct

    async def recording(self: ServerConnection, data: Any) -> None:
        written_from.append(memoryview(data).obj is buffer)
        await direct(self, data)

    monkeypatch.setattr(ServerConnection, "_send_direct", recording)

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        await start_response(send)  # chunked: h11 frames around the buffer without joining
        await send({"type": "http.response.body", "body": memoryview(buffer)})

    port, _ = await start(nursery, app_of(handler))
    [(status, headers, body, _)] = parse(await exchange(port, get()), ["GET"])
    assert (status, headers["transfer-encoding"], body) == (200, "chunked", bytes(buffer))
    assert written_from == [True]


# --- the zero-copy extensions ---------------------------------------------------------------


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[Path, bytes]:
    content = os.urandom(3 * 1024 * 1024 + 17)
    path = tmp_path / "blob"
    path.write_bytes(content)
    return path, content


@pytest.mark.parametrize("length_known", [True, False])
async def test_zerocopysend_ranges_in_several_messages(
    nursery: trio.Nursery, data_file: tuple[Path, bytes], length_known: bool
) -> None:
    path, content = data_file
    ranges = [(1000, 5), (0, 1000), (2 * 1024 * 1024, 1024 * 1024 + 17), (7, 0)]
    expected = b"".join(content[offset : offset + count] for offset, count in ranges)

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        await start_response(send, length=len(expected) if length_known else None)
        with path.open("rb") as file:
            for offset, count in ranges:
                message = {"type": "http.response.zerocopysend", "file": file, "more_body": True}
                await send({**message, "offset": offset, "count": count})
            await send({"type": "http.response.body", "body": b""})

    port, _ = await start(nursery, app_of(handler))
    [(status, headers, body, complete)] = parse(await exchange(port, get()), ["GET"])
    assert (status, complete, body) == (200, True, expected)
    assert ("content-length" in headers) is length_known


async def test_zerocopysend_without_offset_and_count_follows_the_file_position(
    nursery: trio.Nursery, data_file: tuple[Path, bytes]
) -> None:
    path, content = data_file
    positions: list[int] = []

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        await start_response(send, length=len(content) - 100)
        with path.open("rb") as file:
            file.seek(100)
            await send({"type": "http.response.zerocopysend", "file": file})
            positions.append(file.tell())

    port, _ = await start(nursery, app_of(handler))
    [(status, _, body, complete)] = parse(await exchange(port, get()), ["GET"])
    assert (status, complete, body) == (200, True, content[100:])
    assert positions == [len(content)]  # the range was read from the position, which advanced


async def test_a_growing_file_goes_out_as_its_bytes_land(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """An in-flight download: the app sends each new range as the writer appends it."""
    path = tmp_path / "growing"
    parts = [os.urandom(300_000) for _ in range(5)]
    total = sum(map(len, parts))

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        await start_response(send, length=total)
        with path.open("wb") as writer, path.open("rb") as reader:
            sent = 0
            for part in parts:
                writer.write(part)
                writer.flush()
                await trio.lowlevel.checkpoint()
                await send(
                    {
                        "type": "http.response.zerocopysend",
                        "file": reader,
                        "offset": sent,
                        "count": len(part),
                        "more_body": sent + len(part) < total,
                    }
                )
                sent += len(part)

    port, _ = await start(nursery, app_of(handler))
    [(status, _, body, complete)] = parse(await exchange(port, get()), ["GET"])
    assert (status, complete, body) == (200, True, b"".join(parts))


async def test_a_file_shorter_than_announced_cuts_the_response(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    path = tmp_path / "short"
    path.write_bytes(b"0123456789")

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        await start_response(send, length=100)
        with path.open("rb") as file:
            await send({"type": "http.response.zerocopysend", "file": file, "count": 100})

    port, _ = await start(nursery, app_of(handler))
    [(status, _, body, complete)] = parse(await exchange(port, get(close=False)), ["GET"])
    assert (status, complete, body) == (200, False, b"0123456789")  # then the server closed


async def test_pathsend_sends_the_whole_file(
    nursery: trio.Nursery, data_file: tuple[Path, bytes]
) -> None:
    path, content = data_file

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        await start_response(send, length=len(content))
        await send({"type": "http.response.pathsend", "path": str(path)})

    port, _ = await start(nursery, app_of(handler))
    raw = get(close=False) + get()
    got = parse(await exchange(port, raw), ["GET", "GET"])
    assert [(status, complete, body) for status, _, body, complete in got] == [
        (200, True, content),
        (200, True, content),
    ]


@pytest.mark.parametrize("how", ["body", "zerocopysend", "pathsend"])
async def test_head_gets_the_head_only_and_keeps_the_connection(
    nursery: trio.Nursery, data_file: tuple[Path, bytes], how: str
) -> None:
    path, content = data_file

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        await start_response(send, length=len(content))
        if how == "body":
            await send({"type": "http.response.body", "body": content})
        elif how == "zerocopysend":
            with path.open("rb") as file:
                await send({"type": "http.response.zerocopysend", "file": file, "offset": 0})
        else:
            await send({"type": "http.response.pathsend", "path": str(path)})

    port, _ = await start(nursery, app_of(handler))
    answer = await exchange(port, get(method="HEAD", close=False) + get())
    head, full = parse(answer, ["HEAD", "GET"])
    assert (head[0], head[1]["content-length"], head[2], head[3]) == (
        200,
        str(len(content)),
        b"",
        True,
    )
    assert (full[0], full[2]) == (200, content)


# --- failing apps -----------------------------------------------------------------------------


async def test_an_app_failing_before_its_answer_gives_a_500(nursery: trio.Nursery) -> None:
    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/started":
            await start_response(send, length=10)  # nothing went out yet: a 500 still can
        raise ValueError("broken app")

    port, _ = await start(nursery, app_of(handler))
    for path in ("/", "/started"):
        [(status, _, body, complete)] = parse(await exchange(port, get(path)), ["GET"])
        assert (status, body, complete) == (500, b"", True)


async def test_an_app_failing_midway_cuts_the_response(nursery: trio.Nursery) -> None:
    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        await start_response(send, length=10)
        await send({"type": "http.response.body", "body": b"12345", "more_body": True})
        raise ValueError("broken app")

    port, _ = await start(nursery, app_of(handler))
    # keep-alive asked, a second request queued: the server closes after the cut answer
    answer = await exchange(port, get(close=False) + get())
    [(status, _, body, complete)] = parse(answer, ["GET"])
    assert (status, body, complete) == (200, b"12345", False)
    assert answer.count(b"HTTP/1.1") == 1


async def test_malformed_requests_get_a_400_before_the_app(nursery: trio.Nursery) -> None:
    called: list[Scope] = []

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        called.append(scope)

    port, _ = await start(nursery, app_of(handler))
    answer = await exchange(port, b"GET /x HTTP/1.1\r\nno colon\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert called == []
