"""Peer answers are untrusted input (issue 17): whatever status and headers a peer sends, it is a
failed attempt at worst and the next provider is asked; never a 500, never a race cancelled for
the good peers in it.

Two properties: the header checks themselves (`check_peer_answer`, Retry-After) raise nothing but
their own errors for any text; and a real mirror node on loopback, asked for a blob that a lying
peer (asked first) and a good one provide, always answers with the good bytes.
"""

from __future__ import annotations

import functools
import os

import httpx
import trio
import trio.testing
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from registry.interfaces import Peer
from registry.mirror.job import MirrorSettings
from registry.mirror.peer_answer import PeerAnswerError, check_peer_answer
from registry.mirror.peer_transfer import _retry_after
from registry.oci.ranges import ByteRange
from registry.serve.app import Registry, RegistrySettings
from registry.serve.server import run_registry
from tests.fakes import MemoryContentStore, MemoryNetwork, MemoryRouter, sha256_digest
from tests.registry.conftest import LOOPBACK, ScriptedPeer

FAST = MirrorSettings(resolve_timeout=1.0, response_timeout=1.0, stall_timeout=1.0)

# numbers as a hostile peer writes them: Unicode digits str.isdigit() takes, signs, overflow
HOSTILE_NUMBERS = [
    "²",
    "¹²",
    "\u0661\u0662",  # Arabic-Indic digits
    "\uff11\uff12",  # fullwidth digits
    "-1",
    "-0",
    "+5",
    "1e3",
    "0x10",
    " ",
    "",
    "99999999999999999999999999",
    "18446744073709551616",
    "12abc",
    "1.5",
    "NaN",
    "Wed, 21 Oct 2015 07:28:00 GMT",
]
numbers = st.one_of(st.sampled_from(HOSTILE_NUMBERS), st.integers(-(10**30), 10**30).map(str))
header_text = st.one_of(numbers, st.text(max_size=40))


def content_ranges() -> st.SearchStrategy[str]:
    spans = st.tuples(numbers, numbers, numbers).map(lambda t: f"bytes {t[0]}-{t[1]}/{t[2]}")
    return st.one_of(spans, header_text, st.just("bytes */10"), st.just("bits 0-1/2"))


@settings(max_examples=400, deadline=None)
@example(200, "\xb2", None, None, None, False)
@example(206, "4", "bytes 2-5/1\xb2", None, None, True)
@given(
    status=st.one_of(st.sampled_from([200, 206]), st.integers(0, 1000)),
    length=st.one_of(st.none(), header_text),
    content_range=st.one_of(st.none(), content_ranges()),
    digest=st.one_of(st.none(), header_text, st.just("sha256:" + "a" * 64)),
    media_type=st.one_of(st.none(), header_text),
    ranged=st.booleans(),
)
def test_header_checks_raise_only_their_own_errors(
    status: int,
    length: str | None,
    content_range: str | None,
    digest: str | None,
    media_type: str | None,
    ranged: bool,
) -> None:
    headers = {
        name: value
        for name, value in (
            ("content-length", length),
            ("content-range", content_range),
            ("docker-content-digest", digest),
            ("content-type", media_type),
        )
        if value is not None
    }
    try:
        answer = check_peer_answer(
            status=status,
            headers=headers,
            expected_digest="sha256:" + "a" * 64,
            is_blob=True,
            is_head=False,
            requested=ByteRange(2, 5, 10) if ranged else None,
        )
    except PeerAnswerError:
        event("refused")
        return
    event("accepted")
    assert answer.length >= 0 and answer.size >= 0 and answer.offset >= 0


@given(header_text)
def test_retry_after_is_a_bounded_number_for_any_text(value: str) -> None:
    assert 0 <= _retry_after(value) <= 60


# --- a lying peer and a good one, over real sockets --------------------------------------------

STATUS_LINES = [
    "200 OK",
    "206 Partial Content",
    "404 Not Found",
    "429 Too Many Requests",
    "503 Service Unavailable",
    "500 Internal Server Error",
    "302 Found",
    "204 No Content",
    "304 Not Modified",
    "100 Continue",
    "101 Switching Protocols",
    "999 Whatever",
    "200 \xb2",
]
HEADER_NAMES = ["content-length", "content-range", "retry-after", "docker-content-digest"]


@st.composite
def lies(draw: st.DrawFn) -> tuple[str, dict[str, str], bool]:
    """A status line, headers (a valid set with 1-3 of them made hostile) and whether the body
    is sent at all."""
    status = draw(st.sampled_from(STATUS_LINES))
    changes = draw(
        st.dictionaries(
            st.sampled_from(HEADER_NAMES),
            st.one_of(numbers, content_ranges(), st.sampled_from(["\xb2", "\xb9\xb2", "\xff"])),
            min_size=1,
            max_size=3,
        )
    )
    return status, changes, draw(st.booleans())


class LyingPeer:
    def __init__(self, status: str, headers: dict[str, str], send_body: bool, body: bytes) -> None:
        self.status, self.headers, self.send_body, self.body = status, headers, send_body, body
        self.asked = 0
        self.port = 0

    @property
    def peer(self) -> Peer:
        return Peer(node_id=b"\x66" * 32, host=LOOPBACK, port=self.port)

    async def handle(self, stream: trio.SocketStream) -> None:
        request = b""
        try:
            while b"\r\n\r\n" not in request:
                data = await stream.receive_some(65536)
                if not data:
                    return
                request += data
            self.asked += 1
            lines = [f"HTTP/1.1 {self.status}"]
            headers = {
                "content-type": "application/octet-stream",
                "docker-content-digest": sha256_digest(self.body),
                "content-length": str(len(self.body)),
                **self.headers,
            }
            lines += [f"{name}: {value}" for name, value in headers.items()]
            # header values go out as latin-1 bytes (0xB2 is "²"), what h11 hands on as obs-text
            head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
            if all(ord(ch) < 256 for ch in "".join(lines)):
                head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
            await stream.send_all(head + (self.body if self.send_body else b""))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def mirror_with_a_liar(
    lie: tuple[str, dict[str, str], bool], body: bytes
) -> tuple[int, bytes, int]:
    digest = sha256_digest(body)
    liar = LyingPeer(*lie, body=body)
    good = ScriptedPeer("serve", body=body, digest=digest)
    network = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        for server in (liar, good):
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, server.handle, 0, host=LOOPBACK)
            )
            server.port = listeners[0].socket.getsockname()[1]
        network.add(digest, liar.peer)  # asked first
        network.add(digest, good.peer)
        registry = Registry(
            MemoryContentStore(), MemoryRouter(network), RegistrySettings(mirror=FAST)
        )
        port = await nursery.start(functools.partial(run_registry, registry, LOOPBACK, 0))
        async with httpx.AsyncClient(base_url=f"http://{LOOPBACK}:{port}", timeout=20) as http:
            answer = await http.get(f"/v2/a/blobs/{digest}?ns=docker.io")
        nursery.cancel_scope.cancel()
    return answer.status_code, answer.content, liar.asked


@settings(max_examples=40, deadline=None)
@example(("429 Too Many Requests", {"retry-after": "\xb2"}, False))
@example(("503 Service Unavailable", {"retry-after": "\u0661"}, False))
@example(("200 OK", {"content-length": "-1"}, True))
@example(("200 OK", {"content-length": "99999999999999999999999999"}, True))
@given(lies())
def test_a_lying_peer_is_failed_over_to_the_good_one(lie: tuple[str, dict[str, str], bool]) -> None:
    body = os.urandom(4096)
    status, content, asked = trio.run(mirror_with_a_liar, lie, body)
    assert asked >= 1  # the liar was asked (first)
    assert (status, content) == (200, body)
