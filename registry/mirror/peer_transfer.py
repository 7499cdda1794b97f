"""One transfer from one peer: open the request, check what the peer announces, read a body.

Why its own module: the mirror path asks many peers in turn; what happens with a single one (the
request headers we send, the response deadline, the announced digest/size/range checks of
`registry.mirror.peer_answer.check_peer_answer`, reading a whole manifest body within the stall
deadline) does not depend on how the peer was found (`registry.burst.supply`) or on what is then
trusted (`registry.mirror.verification`).

Trust (`registry.auth.peer`, `registry.burst.peer_addresses`): a request goes only to the peer's
allowed addresses; with the cluster key it carries a per-request credential instead of the Basic
password, and a tag's answer is used only when its `Spegla-Peer-Answer` proof verifies for this
request's nonce (checked before the announced digest is used, for GET and HEAD alike).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

import trio

from registry.auth.peer import ANSWER_HEADER, PeerAuth
from registry.burst.own_downloads import REFUSED_HEADER
from registry.burst.peer_addresses import allowed_hosts
from registry.http.client import PeerClient, PeerError, PeerResponse
from registry.interfaces import Peer
from registry.mirror.peer_answer import PeerAnswer, PeerAnswerError, PeerBusy, check_peer_answer
from registry.oci.mediatypes import MANIFEST_MEDIA_TYPES
from registry.oci.ranges import ByteRange

__all__ = [
    "ACCEPT",
    "PeerBusy",
    "PeerFetch",
    "TransferRequest",
    "open_transfer",
    "read_whole_body",
]

ACCEPT = ", ".join(MANIFEST_MEDIA_TYPES)


@dataclass(frozen=True, slots=True)
class TransferRequest:
    """What one mirror request asks of every peer it tries."""

    method: str  # "GET" or "HEAD"
    target: str  # path?ns=registry
    expected_digest: str | None
    is_blob: bool
    user_agent: str
    # sent to peers when Basic auth is configured and there is no cluster key
    authorization: str | None = None
    # the cluster key's credentials: replace `authorization`, and vouch for tag answers
    peer_auth: PeerAuth | None = None
    # what the answer proof of a tag names (`str(Reference)`), and the request's path and `ns`
    # (what the request credential covers)
    reference: str = ""
    path: str = ""
    ns: str = ""
    allow_loopback: bool = False  # peers on loopback addresses (every agent on this one host)

    @property
    def is_head(self) -> bool:
        return self.method == "HEAD"

    def headers(
        self, requested: ByteRange | None, now: float = 0.0
    ) -> tuple[list[tuple[str, str]], str | None]:
        """The request headers for one peer, and the nonce of their credential (None: none)."""
        headers = [
            ("X-Spegel-Mirrored", "true"),
            ("User-Agent", self.user_agent),
            ("Accept", ACCEPT),
        ]
        nonce = None
        if self.peer_auth is not None:
            value, nonce = self.peer_auth.sign(self.method, self.path, self.ns, now)
            headers.append(("Authorization", value))
        elif self.authorization is not None:
            headers.append(("Authorization", self.authorization))
        if requested is not None:
            headers.append(("Range", requested.header))
        return headers, nonce

    def vouch(self, nonce: str | None, proof: str | None) -> Callable[[str], bool] | None:
        """For a tag: whether a digest the peer names is vouched for by its proof (None: this
        request cannot check one, so its tag answers are refused)."""
        auth = self.peer_auth
        if auth is None or nonce is None:
            return None
        return lambda digest: auth.answer_ok(nonce, digest, self.reference, proof)


class PeerFetch:
    """One open peer response and what it announced."""

    def __init__(self, peer: Peer, response: PeerResponse, answer: PeerAnswer) -> None:
        self.peer = peer
        self.response = response
        self.answer = answer


def _retry_after(value: str | None) -> float:
    """Retry-After in seconds (an HTTP date or garbage counts as 1 s), capped at 60 s."""
    text = "" if value is None else value.strip()
    if text.isascii() and text.isdigit() and len(text) < 6:  # not "²": isdigit alone takes it
        return min(float(text), 60.0)
    return 1.0


async def open_transfer(
    client: PeerClient,
    peer: Peer,
    request: TransferRequest,
    stack: AsyncExitStack,
    *,
    requested: ByteRange | None,
    expected_size: int | None,
    response_timeout: float,
    on_not_found: Callable[[], None],
    first_bytes_timeout: float | None = None,
    on_answer: Callable[[], None] | None = None,
) -> PeerFetch:
    """Open `request` at `peer` on `stack` and check its answer.

    Raises PeerError, PeerAnswerError or trio.TooSlowError (the caller closes `stack`); an
    address the policy refuses (`registry.burst.peer_addresses`) is a PeerError before any connect.
    `on_not_found` runs when the peer answers 404 (it advertised a key it no longer has).
    With `first_bytes_timeout`, a GET with a non-empty body returns only once the body's first
    bytes arrived (kept in the response for the reader): an answer is useful only then, so a peer
    that sends its head and then stalls is raced like one that sends nothing
    (`registry.mirror.peer_race`); no bytes within the timeout is a PeerError.  `on_answer` runs
    once
    the peer's head passed the checks (before its first bytes).
    """
    hosts = allowed_hosts(peer, allow_loopback=request.allow_loopback)
    if not hosts or not 0 < peer.port < 65536:
        raise PeerError(f"refused peer address {peer.host}:{peer.port} (not an agent address)")
    headers, nonce = request.headers(requested, time.time())
    with trio.fail_after(response_timeout):
        response = await stack.enter_async_context(
            client.request(
                hosts[0], peer.port, request.method, request.target, headers, also=hosts[1:]
            )
        )
    if response.status == 404:
        on_not_found()
    if response.status in (429, 503):
        refused = response.headers.get(REFUSED_HEADER.lower(), "")[:16]
        raise PeerBusy(_retry_after(response.headers.get("retry-after")), refused)
    answer = check_peer_answer(
        status=response.status,
        headers=response.headers,
        expected_digest=request.expected_digest,
        is_blob=request.is_blob,
        is_head=request.is_head,
        requested=requested,
        expected_size=expected_size,
        vouch=request.vouch(nonce, response.headers.get(ANSWER_HEADER.lower())),
    )
    if not request.is_blob and answer.media_type not in MANIFEST_MEDIA_TYPES:
        raise PeerAnswerError(f"peer sent media type {answer.media_type}")
    if on_answer is not None:
        on_answer()
    if first_bytes_timeout is not None and not request.is_head and answer.length > 0:
        with trio.move_on_after(first_bytes_timeout) as waited:
            await response.first_bytes()
        if waited.cancelled_caught:
            raise PeerError(f"peer sent its head but no body bytes for {first_bytes_timeout:g} s")
    return PeerFetch(peer, response, answer)


async def read_whole_body(fetch: PeerFetch, stall_timeout: float) -> bytes | None:
    """The whole body of `fetch` (no bytes for `stall_timeout` ends it); None if the peer failed."""
    parts: list[bytes | bytearray] = []
    try:
        with trio.fail_after(stall_timeout):
            while (chunk := await fetch.response.receive()) is not None:
                parts.append(chunk)
    except (PeerError, trio.TooSlowError):
        return None
    return b"".join(parts)
