"""How the app's responses reach the ASGI server: quart_trio's HTTP connection, taught file bodies.

Why: Quart sends every body as `http.response.body` messages.  A file body
(`registry.serve.bodies.FileBody`) is opened first (content gone: a 404 instead), then, when the
server offers the ASGI `http.response.zerocopysend` extension (our h11 server does), leaves as
zerocopysend messages the server sendfiles; otherwise (Hypercorn) it streams as chunks.
Invariant: quart_trio cancels the handler
and its response as soon as the server reports `http.disconnect` (the client left), so a
mirrored body's fetch stops at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, cast

import trio
from quart.wrappers import Request
from quart_trio.asgi import TrioASGIHTTPConnection

from registry.interfaces import ContentNotFound
from registry.oci.distribution import ErrorCode
from registry.serve.bodies import FileBody
from registry.serve.responses import Response, oci_error

__all__ = ["ZERO_COPY", "AnswerStats", "RegistryConnection"]

ZERO_COPY = "http.response.zerocopysend"
CLIENT_WATCH = "spegla.client"  # scope key of the request's `ClientWatch`


class ClientWatch:
    """Tells a request whether its client left, once the request asks (`arm`).

    Only an armed request reads `receive` past its body: our server then watches the socket
    and reports `http.disconnect` when the client closed or reset it; the request (handler and
    body) is cancelled at once."""

    def __init__(self, request: trio.Nursery, receive: Any) -> None:
        self.request = request
        self.receive = receive
        self.body_read = trio.Event()
        self.armed = False

    def arm(self) -> None:
        if not self.armed:
            self.armed = True
            self.request.start_soon(self._watch)

    async def _watch(self) -> None:
        await self.body_read.wait()
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self.request.cancel_scope.cancel()


@dataclass(slots=True)
class AnswerStats:
    """Responses the app gave: blob bodies sent by the server's zero-copy extension (`served`,
    HEADs of file-backed blobs included), answered from peers (`mirrored`), all (`requests`)."""

    served: int = 0
    mirrored: int = 0
    answered: int = 0
    refused: int = 0  # peer blob GETs answered 429 (upload slots full, or own-download refusals)

    def requests(self) -> int:
        """Requests answered so far (a running count; the idle heap trimmer watches it move)."""
        return self.answered


class RegistryConnection(TrioASGIHTTPConnection):
    """One ASGI HTTP request of the registry app (see the module docstring)."""

    stats: ClassVar[AnswerStats] = AnswerStats()  # create_app gives each app its own

    async def __call__(self, receive: Any, send: Any) -> None:
        request = self._create_request_from_scope(send)
        async with trio.open_nursery() as nursery:
            watch = ClientWatch(nursery, receive)
            cast(dict[str, Any], self.scope)[CLIENT_WATCH] = watch
            nursery.start_soon(self._read_body, request, watch)
            nursery.start_soon(self.handle_request, nursery, request, send)

    async def _read_body(self, request: Request, watch: ClientWatch) -> None:
        """The request's body (a client gone before it is complete cancels the request)."""
        while True:
            message = await watch.receive()
            if message["type"] == "http.disconnect":
                watch.request.cancel_scope.cancel()
                return
            if message["type"] == "http.request":
                request.body.append(message.get("body", b""))
                if not message.get("more_body", False):
                    request.body.set_complete()
                    watch.body_read.set()
                    return

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
