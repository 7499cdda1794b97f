"""The debug page's live feed (metrics port 9090) takes a bounded number of websocket viewers:
one more is refused with a 503 before the websocket is accepted, and a place that frees up is
given to the next viewer.  A real Hypercorn server and websocket clients on loopback."""

from __future__ import annotations

import functools
import json

import trio
import trio_websocket

from agent.config import ListenAddr
from agent.observability.debug import DebugState
from agent.observability.metrics_server import create_metrics_app, serve_app


async def test_websocket_viewers_beyond_the_cap_are_refused(nursery: trio.Nursery) -> None:
    stop = trio.Event()
    state = DebugState(node_id="n1")
    app = create_metrics_app(state, max_viewers=2)
    port = await nursery.start(
        functools.partial(serve_app, app, ListenAddr("127.0.0.1", 0), shutdown_trigger=stop.wait)
    )
    url = f"ws://127.0.0.1:{port}/debug/web/ws"
    async with trio_websocket.open_websocket_url(url) as first:
        assert json.loads(await first.get_message())["type"] == "snapshot"
        async with trio_websocket.open_websocket_url(url) as second:
            assert json.loads(await second.get_message())["type"] == "snapshot"
            # a third viewer (say, one of many an attacker opens) is turned away cleanly
            refused = None
            try:
                async with trio_websocket.open_websocket_url(url):
                    pass
            except trio_websocket.ConnectionRejected as exc:
                refused = exc
            assert refused is not None and refused.status_code == 503
            assert b"more than 2 live viewers" in (refused.body or b"")
            assert state.viewers == 2
        # the second viewer left: its place goes to the next one
        with trio.fail_after(10):
            while True:
                try:
                    async with trio_websocket.open_websocket_url(url) as third:
                        assert json.loads(await third.get_message())["type"] == "snapshot"
                        break
                except trio_websocket.ConnectionRejected:
                    await trio.sleep(0.05)
    stop.set()
