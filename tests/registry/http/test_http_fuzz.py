"""HTTP fuzzing through a real socket (Hypothesis): whatever a client sends, the registry answers
with a status below 500 (a 4xx for what it cannot read), never hangs past its head timeout and
keeps serving.

The registry (the app on our server, file-backed content, no peers) runs in a thread of its own with
its own Trio loop; each example is a raw request on a fresh blocking socket that half-closes after
sending, so every example must get an answer: a complete request its response, an incomplete or
malformed one a 400 (or 413/431).
"""

from __future__ import annotations

import functools
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import h11
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry.serve.app import Registry
from registry.serve.server import run_registry
from tests.fakes import MemoryContentStore, MemoryRouter
from tests.registry.conftest import Content, fill

HEAD_TIMEOUT = 1.0
ANSWER_WITHIN = HEAD_TIMEOUT + 4.0  # head timeout plus slack for a loaded machine


class Server:
    def __init__(self, content: Content, port: int) -> None:
        self.content = content
        self.port = port


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    files: Path = tmp_path_factory.mktemp("fuzz-content")
    store = MemoryContentStore()
    content = fill(store, files=files)
    registry = Registry(store, MemoryRouter())
    started = threading.Event()
    box: dict[str, object] = {}

    async def serve() -> None:
        stop = trio.Event()
        box["stop"], box["token"] = stop, trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            box["port"] = await nursery.start(
                functools.partial(
                    run_registry,
                    registry,
                    "127.0.0.1",
                    0,
                    shutdown_trigger=stop.wait,
                    head_timeout=HEAD_TIMEOUT,
                    graceful_timeout=0.5,
                )
            )
            started.set()

    def run() -> None:
        try:
            trio.run(serve)
        except BaseException as exc:  # reported by the test below
            box["error"] = exc
            started.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(30), "registry did not start"
    assert "error" not in box, box.get("error")
    yield Server(content, int(box["port"]))  # type: ignore[call-overload]
    trio.from_thread.run_sync(box["stop"].set, trio_token=box["token"])  # type: ignore[attr-defined]
    thread.join(10)
    assert not thread.is_alive(), "registry did not stop"
    assert "error" not in box, f"registry crashed: {box.get('error')!r}"


def exchange(port: int, raw: bytes) -> bytes:
    """Send `raw`, half-close, read until the server closes; raises on a hang."""
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_WITHIN) as sock:
        try:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before we finished sending
        answer = bytearray()
        while True:
            try:
                data = sock.recv(1 << 16)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise AssertionError(
                    f"no close within {ANSWER_WITHIN}s for {raw[:200]!r}"
                ) from None
            if not data:
                break
            answer += data
    return bytes(answer)


def first_status(answer: bytes, method: bytes) -> int:
    """The status of the first response, read by h11 as a client."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(
        h11.Request(
            method="HEAD" if method == b"HEAD" else "GET", target="/", headers=[("Host", "x")]
        )
    )
    conn.receive_data(answer)
    event = conn.next_event()
    assert isinstance(event, h11.Response), (event, answer[:200])
    return event.status_code


_LATER_5XX = re.compile(rb"\r\nHTTP/1\.[01] 5\d\d ")

# -- strategies ---------------------------------------------------------------------------------

DIGESTS = st.one_of(
    st.just("sha256:" + "0" * 64),
    st.text("0123456789abcdef", min_size=0, max_size=70).map(lambda h: "sha256:" + h),
    st.sampled_from(["sha512:" + "a" * 128, "md5:abc", "sha256:", ":", "SHA256:" + "A" * 64]),
    st.text(min_size=0, max_size=20),
)
NAMES = st.one_of(
    st.sampled_from(["library/app", "a", "a/b/c", "UPPER/case", "-bad", "a//b", "a/../b", ".."]),
    st.text(min_size=0, max_size=30),
)
NS_VALUES = st.one_of(
    st.sampled_from(["docker.io", "ghcr.io", "localhost:5000", "", "a b", "::1", "[::1]:5000"]),
    st.text(min_size=0, max_size=30),
)
RANGES = st.one_of(
    st.builds(lambda a, b: f"bytes={a}-{b}", st.integers(-5, 2**70), st.integers(-5, 2**70)),
    st.builds(lambda a: f"bytes=-{a}", st.integers(-5, 2**70)),
    st.sampled_from(["bytes=", "bytes=0-0,5-9", "items=0-1", "bytes=1-0", "bytes=--1", ""]),
    st.text(max_size=20),
)
HEADER_NAMES = st.one_of(
    st.sampled_from(
        ["Range", "Content-Length", "Transfer-Encoding", "Connection", "Expect", "Host",
         "X-Spegel-Mirrored", "Accept", "Authorization", "X-Forwarded-For", "Upgrade"]
    ),
    st.text(min_size=0, max_size=12),
)  # fmt: skip
HEADER_VALUES = st.one_of(
    st.sampled_from(["0", "-1", "5", "chunked", "close", "keep-alive", "100-continue", "true"]),
    RANGES,
    st.binary(max_size=20).map(lambda b: b.decode("latin-1")),
)


def _quote_some(text: str, quote: bool) -> str:
    return "".join(f"%{b:02X}" for b in text.encode()) if quote else text


@st.composite
def targets(draw: st.DrawFn, content: Content) -> str:
    kind = draw(st.sampled_from(["blobs", "manifests", "tags", "other"]))
    name = draw(NAMES)
    if kind == "blobs":
        ref = draw(st.one_of(st.sampled_from([content.layer, content.config]), DIGESTS))
    elif kind == "manifests":
        ref = draw(st.one_of(st.sampled_from([content.manifest, content.index, "v1"]), DIGESTS))
    elif kind == "tags":
        ref = "list"
    else:
        ref = draw(st.text(max_size=20))
    path = f"/v2/{name}/{kind}/{ref}"
    if draw(st.booleans()):
        path = draw(st.sampled_from(["/v2/", "/v2", "/", "/readyz", "/livez", "*", "", "//v2//"]))
    path = _quote_some(path, draw(st.booleans()) and draw(st.booleans()))
    query = draw(st.lists(NS_VALUES, max_size=2))
    if query:
        path += "?" + "&".join(f"ns={_quote_some(q, draw(st.booleans()))}" for q in query)
    if draw(st.booleans()) and draw(st.booleans()):
        path = "http://host:5000" + path
    return path


@st.composite
def raw_requests(draw: st.DrawFn, content: Content) -> tuple[bytes, bytes]:
    method = draw(
        st.one_of(
            st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "get"]),
            st.text(min_size=0, max_size=8),
        )
    )
    target = draw(targets(content))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2", "http/1.1", ""]))
    eol = draw(st.sampled_from(["\r\n", "\r\n", "\n"]))
    headers = []
    if draw(st.booleans()) or version != "HTTP/1.1":
        headers.append(("Host", "x"))
    if draw(st.booleans()):
        headers.append(("Range", draw(RANGES)))
    headers += draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=3))
    lines = [f"{method} {target} {version}".rstrip()]
    lines += [f"{name}: {value}" for name, value in headers]
    head = eol.join(lines) + eol + eol
    raw = head.encode("utf-8", "surrogateescape")
    raw += draw(st.binary(max_size=40))  # a body, a pipelined fragment or junk
    if draw(st.integers(0, 9)) == 0:
        raw = raw[: draw(st.integers(0, len(raw)))]  # cut anywhere
    return raw, method.encode("utf-8", "replace")


# -- the property -------------------------------------------------------------------------------


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_request_gets_a_non_5xx_answer(server: Server, data: st.DataObject) -> None:
    raw, method = data.draw(raw_requests(server.content))
    answer = exchange(server.port, raw)
    if not raw:
        return  # connected and closed without a byte: nothing to answer
    assert answer, f"silence for {raw[:200]!r}"
    status = first_status(answer, method)
    assert status < 500, (status, raw[:200], answer[:300])
    assert not _LATER_5XX.search(answer), (raw[:200], answer[:300])


def test_the_registry_still_serves_after_fuzzing(server: Server) -> None:
    answer = exchange(
        server.port,
        f"GET /v2/library/app/blobs/{server.content.layer}?ns=docker.io HTTP/1.1\r\n"
        "Host: x\r\n\r\n".encode(),
    )
    assert first_status(answer, b"GET") == 200
    assert answer.endswith(server.content.layer_bytes)
