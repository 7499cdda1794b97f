"""Holding an early `http.disconnect` back until the response is complete: an ASGI middleware.

Why: the server reports a client's end of stream at once as `http.disconnect` (the client may
have left), and frameworks such as Quart cancel the request's handler on it.  A client may also
half-close after its request and still read the answer (HTTP/1.0 tools do); a request that is
cheap to answer should be answered.  Only a request whose answer is expensive (work elsewhere
that nobody will read) should stop as soon as the client is gone.

Invariants: wrapped by `hold_disconnect`, an application receives `http.disconnect` only once
its response is complete (its last body message was sent, or a send failed), unless the
request was marked with `watch_client(scope)`: from then on a disconnect passes through,
one that arrived before the mark included.  Other scopes (lifespan, websocket) pass untouched.
Under a server that reports no early disconnect (Hypercorn) the middleware changes nothing.
"""

from __future__ import annotations

from typing import Any

import trio

from registry.http.asgi import AsgiApp, Message, Scope

__all__ = ["hold_disconnect", "watch_client"]

_KEY = "registry.http.disconnect"  # the scope key of a request's `_Hold`
_LAST = frozenset({"http.response.body", "http.response.zerocopysend"})


class _Hold:
    __slots__ = ("release",)

    def __init__(self) -> None:
        self.release = trio.Event()  # set: a disconnect passes through


def watch_client(scope: Scope) -> None:
    """Let this request's `http.disconnect` through as soon as the client goes (mark it before
    starting expensive work; a disconnect already held back is released now)."""
    hold = scope.get(_KEY)
    if isinstance(hold, _Hold):
        hold.release.set()


def _is_last(message: Message) -> bool:
    kind = message.get("type")
    if kind == "http.response.pathsend":
        return True
    return kind in _LAST and not message.get("more_body", False)


def hold_disconnect(app: AsgiApp) -> AsgiApp:
    """`app`, receiving an early `http.disconnect` only for requests marked by `watch_client`."""

    async def held(scope: Scope, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await app(scope, receive, send)
            return
        hold = _Hold()
        scope[_KEY] = hold

        async def held_receive() -> Message:
            message: Message = await receive()
            if message.get("type") == "http.disconnect":
                await hold.release.wait()
            return message

        async def watched_send(message: Message) -> None:
            try:
                await send(message)
            except BaseException:
                hold.release.set()  # the client cannot be answered: let the app learn it
                raise
            if _is_last(message):
                hold.release.set()

        await app(scope, held_receive, watched_send)

    return held
