"""How the app's responses reach the ASGI server: quart_trio's HTTP connection, taught file bodies.

Why: Quart sends every body as `http.response.body` messages.  A file body
(`registry.serve.bodies.FileBody`) is opened first (content gone: a 404 instead), then, when the
server offers the ASGI `http.response.zerocopysend` extension (our h11 server does), leaves as
zerocopysend messages the server sendfiles; otherwise (Hypercorn) it streams as chunks.
A request runs in the server's task, without a nursery or a task of its own: once its body is
read, nothing reads `receive` unless the request asks (`ClientWatch.start`: a request answered
from peers), so a client that half-closes after its request still gets a local answer, while a
mirrored request is cancelled, handler and body, as soon as the server reports
`http.disconnect` (its fetch stops at once).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import trio
from quart_trio.asgi import TrioASGIHTTPConnection

from registry.interfaces import ContentNotFound
from registry.oci.distribution import ErrorCode
from registry.serve.bodies import FileBody
from registry.serve.responses import Response, oci_error

__all__ = ["CLIENT_WATCH", "ZERO_COPY", "AnswerStats", "ClientWatch", "RegistryConnection"]

ZERO_COPY = "http.response.zerocopysend"
CLIENT_WATCH = "spegla.client"  # scope key of the request's `ClientWatch`


class ClientWatch:
    """A request's client, watched on demand."""

    def __init__(self, request: trio.CancelScope, receive: Any) -> None:
        self.request = request  # the request's cancel scope (handler and body)
        self.receive = receive

    def start(self, nursery: trio.Nursery) -> Callable[[], None]:
        """Watch in a task of `nursery`: when the server reports `http.disconnect`, cancel the
        request.  Returns what stops the watch (call it once the request is over)."""
        stop = trio.CancelScope()

        async def watch() -> None:
            with stop:
                while (await self.receive())["type"] != "http.disconnect":
                    pass
                self.request.cancel()

        nursery.start_soon(watch)
        return stop.cancel


@dataclass(slots=True)
class AnswerStats:
    """Responses the app gave: file-backed blob answers on a server with the zero-copy extension
    (`served`, HEADs included), answers from peers (`mirrored`, misses included), all
    (`answered`), peer blob GETs refused with a 429 (`refused`)."""

    served: int = 0
    mirrored: int = 0
    answered: int = 0
    refused: int = 0

    def requests(self) -> int:
        """Requests answered so far (a running count; the idle heap trimmer watches it move)."""
        return self.answered


class RegistryConnection(TrioASGIHTTPConnection):
    """One ASGI HTTP request of the registry app (see the module docstring)."""

    stats: ClassVar[AnswerStats] = AnswerStats()  # create_app gives each app its own

    async def __call__(self, receive: Any, send: Any) -> None:
        request = self._create_request_from_scope(send)
        while True:  # the request's body (a client gone before it ended is not answered)
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            if message["type"] == "http.request":
                request.body.append(message.get("body", b""))
                if not message.get("more_body", False):
                    request.body.set_complete()
                    break
        with trio.CancelScope() as scope:
            cast(dict[str, Any], self.scope)[CLIENT_WATCH] = ClientWatch(scope, receive)
            response = await self.app.handle_request(request)
            await self._send_response(send, response)

    async def _send_response(self, send: Any, response: Any) -> None:
        self.stats.answered += 1
        body = getattr(response, "response", None)
        if isinstance(body, FileBody):
            await self._send_file(send, response, body)
        else:
            await super()._send_response(send, response)

    async def _send_file(self, send: Any, response: Response, body: FileBody) -> None:
        try:
            await body.__aenter__()
        except (ContentNotFound, OSError) as exc:
            gone = oci_error(404, ErrorCode.BLOB_UNKNOWN, f"blob not found: {exc}")
            await super()._send_response(send, gone)
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [
                        (name.lower().encode("latin-1"), value.encode("latin-1"))
                        for name, value in response.headers.items()
                    ],
                }
            )
            zero_copy = ZERO_COPY in (self.scope.get("extensions") or {})
            if zero_copy and body.has_file():
                self.stats.served += 1
            if body.length and self.scope["method"] != "HEAD":
                if not (zero_copy and await body.zero_copy(send)):
                    async for data in body:
                        await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await body.close()
