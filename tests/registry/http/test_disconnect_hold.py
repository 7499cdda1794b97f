"""`registry.http.disconnect` with a Quart-Trio app on the generic server, real loopback sockets:
a half-closed client's end of stream does not cancel a cheap request (it gets its answer), a
request marked with `watch_client` is cancelled when its client leaves (also when the client
left before the mark)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from quart import request
from quart_trio import QuartTrio

from registry.http.disconnect import hold_disconnect, watch_client
from tests.registry.http.test_asgi_server import LOOPBACK, get, parse, start


def recording(app: Any, disconnected: trio.Event) -> Any:
    """`app`, with `disconnected` set once the server reported the client's end of stream."""

    async def outer(scope: Any, receive: Any, send: Any) -> None:
        async def receive_and_note() -> Any:
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected.set()
            return message

        await app(scope, receive_and_note, send)

    return outer


def quart_app(disconnected: trio.Event, events: list[str]) -> QuartTrio:
    app = QuartTrio(__name__)

    @app.route("/cheap")
    async def cheap() -> str:
        try:
            await disconnected.wait()  # answered only after the end of stream was reported
        except trio.Cancelled:
            events.append("cheap cancelled")
            raise
        return "answer"

    @app.route("/watched")
    async def watched() -> str:
        if request.args.get("late"):
            await disconnected.wait()  # the client left before the request was marked
        watch_client(request.scope)
        try:
            await trio.sleep_forever()  # an expensive fetch elsewhere
        finally:
            events.append("watched cancelled")
        return "never"  # pragma: no cover

    return app


@pytest.mark.parametrize("held", [True, False])
async def test_a_half_closed_client_gets_its_cheap_answer(
    nursery: trio.Nursery, held: bool
) -> None:
    disconnected = trio.Event()
    events: list[str] = []
    app = quart_app(disconnected, events)
    port, _ = await start(nursery, recording(hold_disconnect(app) if held else app, disconnected))
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    await stream.send_all(get("/cheap", close=False))
    await stream.send_eof()  # half-close: the answer is still read
    answer = bytearray()
    with trio.fail_after(5):
        while data := await stream.receive_some(1 << 16):
            answer += data
    await stream.aclose()
    assert disconnected.is_set()
    if held:
        assert parse(bytes(answer), ["GET"])[0][::2] == (200, b"answer")
        assert events == []
    else:  # plain Quart takes the end of stream as a departure: the request is cancelled
        assert bytes(answer) == b""


@pytest.mark.parametrize("target", ["/watched", "/watched?late=1"])
async def test_a_watched_request_stops_when_its_client_leaves(
    nursery: trio.Nursery, target: str
) -> None:
    disconnected = trio.Event()
    events: list[str] = []
    port, _ = await start(
        nursery, recording(hold_disconnect(quart_app(disconnected, events)), disconnected)
    )
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    await stream.send_all(get(target, close=False))
    await trio.testing.wait_all_tasks_blocked()
    await stream.aclose()
    with trio.fail_after(5):
        while events != ["watched cancelled"]:  # noqa: ASYNC110
            await trio.sleep(0.01)
    assert disconnected.is_set()
