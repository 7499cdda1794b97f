"""How the app's responses reach the ASGI server: quart_trio's HTTP connection, taught file bodies.

Why: Quart sends every body as `http.response.body` messages.  A file body
(`registry.serve.bodies.FileBody`) is opened first (content gone: a 404 instead), then, when the
server offers the ASGI `http.response.zerocopysend` extension (our h11 server does), leaves as
zerocopysend messages the server sendfiles; otherwise (Hypercorn) it streams as chunks.
Invariant: quart_trio cancels the request, handler and body, when `receive` gives
`http.disconnect`; the app (`registry.serve.app`) lets an early disconnect through only for a
request answered from peers (`registry.http.disconnect.watch_client`), so its fetch stops as soon
as its client leaves, while a client that half-closes after its request still gets a local
answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from quart_trio.asgi import TrioASGIHTTPConnection

from registry.interfaces import ContentNotFound
from registry.oci.distribution import ErrorCode
from registry.serve.bodies import FileBody
from registry.serve.responses import Response, oci_error

__all__ = ["ZERO_COPY", "AnswerStats", "RegistryConnection"]

ZERO_COPY = "http.response.zerocopysend"


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
