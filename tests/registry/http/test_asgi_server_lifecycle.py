"""The generic ASGI server's lifecycle on real loopback sockets, with tiny apps written here:
`http.disconnect` when a client leaves (and not when it pipelines), the lifespan protocol (a
raw app and a Quart-Trio app), the 503 over the connection cap, the send deadline (MockClock)
and graceful shutdown."""

from __future__ import annotations

import socket
import struct

import pytest
import trio
import trio.testing
from quart_trio import QuartTrio

from registry.http.lifespan import DEFAULT_LIFESPAN_TIMEOUT, LifespanFailed
from registry.http.server import OVER_CAPACITY, ConnectionLimits, ServerStats
from tests.registry.http.test_asgi_server import (
    LOOPBACK,
    Receive,
    Scope,
    Send,
    app_of,
    exchange,
    get,
    parse,
    start,
    start_response,
)

# --- http.disconnect ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "reset"])
@pytest.mark.parametrize("started", [False, True])
async def test_a_client_leaving_is_told_to_the_app_and_stops_its_work(
    nursery: trio.Nursery, how: str, started: bool
) -> None:
    """The app waits on a slow upstream and on `receive`; the client leaves (before any byte
    or after the head and a first piece): `http.disconnect` arrives and the app cancels its
    upstream work.  After a reset every send raises; after a close the server cannot know yet
    (the first write after it may still succeed)."""
    waiting = trio.Event()
    outcome: list[str] = []

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # the (empty) request body
        if started:
            await start_response(send, length=10)
            await send({"type": "http.response.body", "body": b"12345", "more_body": True})
        async with trio.open_nursery() as work:

            async def upstream() -> None:
                try:
                    await trio.sleep_forever()
                finally:
                    outcome.append("upstream cancelled")

            work.start_soon(upstream)
            waiting.set()
            message = await receive()
            outcome.append(message["type"])
            work.cancel_scope.cancel()
        try:
            if not started:
                await start_response(send, length=10)
                await send({"type": "http.response.body", "body": b"12345", "more_body": True})
            await send({"type": "http.response.body", "body": b"67890"})
            outcome.append("sent")
        except Exception as exc:
            outcome.append(type(exc).__name__)

    port, _ = await start(nursery, app_of(handler))
    client = trio.socket.socket()
    await client.connect((LOOPBACK, port))
    await client.send(get(close=False))
    with trio.fail_after(5):
        await waiting.wait()
        if started:
            assert (await client.recv(1 << 16)).endswith(b"12345")
        if how == "reset":  # SO_LINGER 0: close sends a reset
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        while len(outcome) < 3:  # noqa: ASYNC110 - the app's own steps, in order
            await trio.sleep(0.01)
    assert outcome[:2] == ["http.disconnect", "upstream cancelled"]
    assert outcome[2] in (["ClientGone"] if how == "reset" else ["ClientGone", "sent"])


async def test_a_half_closed_client_still_gets_what_the_app_sends(nursery: trio.Nursery) -> None:
    """An end of stream is reported (`http.disconnect`), but it may be a half-close: an app
    that answers anyway gets its answer to the client."""
    seen: list[str] = []

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        seen.append((await receive())["type"])  # the client's end of stream
        await start_response(send, length=6)
        await send({"type": "http.response.body", "body": b"answer"})

    port, _ = await start(nursery, app_of(handler))
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    await stream.send_all(get("/", method="GET", close=False))
    await stream.send_eof()
    answer = bytearray()
    with trio.fail_after(5):
        while data := await stream.receive_some(1 << 16):
            answer += data
    await stream.aclose()
    assert seen == ["http.disconnect"]
    assert parse(bytes(answer), ["GET"])[0][::2] == (200, b"answer")


async def test_receive_waits_for_the_end_of_the_response_when_the_client_stays(
    nursery: trio.Nursery,
) -> None:
    """A pipelined second request is not a departure: the first request's `receive` gives
    `http.disconnect` only once its response is complete, and both requests are answered."""
    events: list[str] = []
    answering = trio.Event()

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                message = await receive()
                events.append(f"{scope['path']} {message['type']}")

            nursery.start_soon(watch)
            if scope["path"] == "/first":
                await answering.wait()  # the second request's bytes are in by then
            await start_response(send, length=2)
            events.append(f"{scope['path']} answered")
            await send({"type": "http.response.body", "body": b"ok"})

    port, _ = await start(nursery, app_of(handler))
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    await stream.send_all(get("/first", close=False) + get("/second"))
    await trio.testing.wait_all_tasks_blocked()
    answering.set()
    answer = bytearray()
    with trio.fail_after(5):
        while data := await stream.receive_some(1 << 16):
            answer += data
    await stream.aclose()
    got = parse(bytes(answer), ["GET", "GET"])
    assert [(status, body) for status, _, body, _ in got] == [(200, b"ok"), (200, b"ok")]
    assert events == [
        "/first answered",
        "/first http.disconnect",
        "/second answered",
        "/second http.disconnect",
    ]


# --- lifespan -------------------------------------------------------------------------------


async def test_lifespan_startup_state_and_shutdown() -> None:
    events: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                events.append(message["type"])
                if message["type"] == "lifespan.startup":
                    scope["state"]["greeting"] = b"hello from startup"
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = scope["state"]["greeting"]
        await start_response(send, length=len(body))
        await send({"type": "http.response.body", "body": body})

    async with trio.open_nursery() as nursery:
        port, stop = await start(nursery, app)
        assert events == ["lifespan.startup"]  # started: startup complete before any request
        [(status, _, body, _)] = parse(await exchange(port, get()), ["GET"])
        assert (status, body) == (200, b"hello from startup")
        stop.set()
    assert events == ["lifespan.startup", "lifespan.shutdown"]


async def test_a_failed_startup_stops_the_server_before_it_serves() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no database"})

    with pytest.RaisesGroup(
        pytest.RaisesExc(LifespanFailed, match="no database"), flatten_subgroups=True
    ):
        async with trio.open_nursery() as nursery:
            await start(nursery, app)


async def test_a_startup_that_never_ends_fails_after_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await trio.sleep_forever()  # startup never completes

    with pytest.RaisesGroup(trio.TooSlowError, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await start(nursery, app)
    assert trio.current_time() == pytest.approx(DEFAULT_LIFESPAN_TIMEOUT)


async def test_a_shutdown_that_never_ends_is_waited_for_at_most_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await trio.sleep_forever()  # never answers the shutdown

    async with trio.open_nursery() as nursery:
        _, stop = await start(nursery, app)
        stop.set()
    assert trio.current_time() == pytest.approx(DEFAULT_LIFESPAN_TIMEOUT)


async def test_an_app_without_lifespan_is_served(nursery: trio.Nursery) -> None:
    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        await start_response(send, length=2)
        await send({"type": "http.response.body", "body": b"ok"})

    port, _ = await start(nursery, app_of(handler))  # app_of raises on the lifespan scope
    assert parse(await exchange(port, get()), ["GET"])[0][::2] == (200, b"ok")


async def test_a_quart_trio_app_runs_with_its_lifespan_and_disconnects() -> None:
    app = QuartTrio(__name__)
    events: list[str] = []
    waiting = trio.Event()

    @app.before_serving
    async def started() -> None:
        events.append("before serving")

    @app.after_serving
    async def stopped() -> None:
        events.append("after serving")

    @app.route("/hello")
    async def hello() -> str:
        return "hello"

    @app.route("/slow")
    async def slow() -> str:
        try:
            waiting.set()
            await trio.sleep_forever()
        finally:
            events.append("slow handler cancelled")
        return "never"  # pragma: no cover

    async with trio.open_nursery() as nursery:
        port, stop = await start(nursery, app)
        [(status, _, body, _)] = parse(await exchange(port, get("/hello")), ["GET"])
        assert (status, body) == (200, b"hello")
        stream = await trio.open_tcp_stream(LOOPBACK, port)
        await stream.send_all(get("/slow"))
        with trio.fail_after(5):
            await waiting.wait()
            await stream.aclose()  # the client leaves: Quart cancels the handler
            while "slow handler cancelled" not in events:  # noqa: ASYNC110
                await trio.sleep(0.01)
        stop.set()
    assert events == ["before serving", "slow handler cancelled", "after serving"]


# --- limits ---------------------------------------------------------------------------------


async def test_over_the_connection_cap_a_new_connection_gets_a_503(nursery: trio.Nursery) -> None:
    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        await start_response(send, length=2)
        await send({"type": "http.response.body", "body": b"ok"})

    stats = ServerStats()
    port, _ = await start(
        nursery, app_of(handler), limits=ConnectionLimits(max_connections=1), stats=stats
    )
    kept = await trio.open_tcp_stream(LOOPBACK, port)  # keep-alive: holds the one place
    await kept.send_all(get(close=False))
    assert (await kept.receive_some(1 << 16)).endswith(b"ok")
    assert await exchange(port, get()) == OVER_CAPACITY
    await kept.aclose()
    with trio.fail_after(5):
        while True:  # the place is free once the server saw the close
            answer = await exchange(port, get())
            if answer != OVER_CAPACITY:
                break
            await trio.sleep(0.01)
    assert parse(answer, ["GET"])[0][::2] == (200, b"ok")
    assert stats.requests == 2 and stats.refused >= 1
    assert stats.snapshot() == {"requests": 2, "refused": stats.refused}


SEND_TIMEOUT = 5.0
BIG = 64 * 1024 * 1024


async def test_a_client_that_reads_nothing_is_cut_after_the_send_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    outcome: list[tuple[str, float]] = []
    piece = bytes(1024 * 1024)

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        await start_response(send, length=BIG)
        try:
            for _ in range(BIG // len(piece)):
                await send({"type": "http.response.body", "body": piece, "more_body": True})
        except Exception as exc:
            outcome.append((type(exc).__name__, trio.current_time()))
            raise

    async with trio.open_nursery() as nursery:
        port, stop = await start(
            nursery, app_of(handler), limits=ConnectionLimits(send_timeout=SEND_TIMEOUT)
        )
        stream = await trio.open_tcp_stream(LOOPBACK, port)
        await stream.send_all(get())
        began = trio.current_time()
        with trio.fail_after(10 * SEND_TIMEOUT):  # hang guard, on the same mock clock
            while not outcome:  # noqa: ASYNC110 - the client reads nothing meanwhile
                await trio.sleep(1)
            received = 0
            try:  # the connection was cut: the client finds its end after a partial body
                while data := await stream.receive_some(1 << 20):
                    received += len(data)
            except trio.BrokenResourceError:
                pass
        await stream.aclose()
        stop.set()
    [(error, when)] = outcome
    assert error == "ClientGone"
    assert when - began >= SEND_TIMEOUT
    assert received < BIG


async def test_shutdown_closes_idle_connections_and_lets_running_requests_finish(
    autojump_clock: trio.testing.MockClock,
) -> None:
    finished: list[str] = []

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        await trio.sleep(float(scope["path"].strip("/")))  # seconds of work
        await start_response(send, length=2)
        await send({"type": "http.response.body", "body": b"ok"})
        finished.append(scope["path"])

    async def ask(port: int, path: str, answers: dict[str, bytes]) -> None:
        answers[path] = await exchange(port, get(path, close=False))

    answers: dict[str, bytes] = {}
    async with trio.open_nursery() as nursery:
        port, stop = await start(nursery, app_of(handler), graceful_timeout=3.0)
        idle = await trio.open_tcp_stream(LOOPBACK, port)
        await idle.send_all(get("/0", close=False))
        assert (await idle.receive_some(1 << 16)).endswith(b"ok")
        async with trio.open_nursery() as clients:
            clients.start_soon(ask, port, "/1", answers)  # done within the grace
            clients.start_soon(ask, port, "/100", answers)  # cut at the end of the grace
            await trio.sleep(0.5)
            stopped_at = trio.current_time()
            stop.set()
            with trio.fail_after(1):  # the idle connection is closed at once
                assert await idle.receive_some(1) == b""
    assert trio.current_time() - stopped_at == pytest.approx(3.0, abs=0.1)
    await idle.aclose()
    assert parse(answers["/1"], ["GET"])[0][::2] == (200, b"ok")
    assert answers["/100"] == b""
    assert finished == ["/0", "/1"]
