"""The mirror's pure decisions, the resolve deadlines under a mock clock, and the peer client."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from registry.burst.attempts import MirrorAttempts
from registry.http.client import PeerClient, PeerError
from registry.interfaces import Peer
from registry.mirror.forwarder import Forwarder
from registry.mirror.job import MirrorFailure, MirrorItem, MirrorJob, MirrorSettings
from registry.mirror.peer_answer import (
    PeerAnswerError,
    Quarantine,
    StaleProviders,
    check_peer_answer,
)
from registry.oci.distribution import ContentKind, ContentRequest, ErrorCode
from registry.oci.ranges import ByteRange
from registry.oci.reference import Reference
from tests.fakes import MemoryNetwork, MemoryRouter
from tests.registry.conftest import answer_each_request

D = "sha256:" + "ab" * 32
P1 = Peer(b"\x01" * 32, "127.0.0.1", 1)
P2 = Peer(b"\x02" * 32, "127.0.0.1", 2)


def test_attempts_count_failures_not_successes() -> None:
    attempts = MirrorAttempts("k", 3)
    assert attempts.usable(P1)
    attempts.start_fetch(P1)
    assert not attempts.usable(P1)
    assert attempts.fetch_failed() is None
    assert attempts.wait_timed_out() is None
    give_up = attempts.fetch_failed()
    assert give_up is not None and give_up.attempts == 3
    assert "all request retries exhausted for k" == give_up.message


def test_attempts_messages() -> None:
    assert MirrorAttempts("k", 3).converged().message == "could not find peer for k"
    tried = MirrorAttempts("k", 3)
    tried.start_fetch(P1)
    assert tried.converged().message == "all request retries exhausted for k"
    waits = MirrorAttempts("k", 1)
    give_up = waits.wait_timed_out()
    assert give_up is not None and give_up.message.startswith("waited too long")
    assert not MirrorAttempts("k", 3, avoid=frozenset({("127.0.0.1", 2)})).usable(P2)


def test_quarantine_is_bounded_and_per_digest() -> None:
    q = Quarantine(max_digests=2)
    q.add("a", ("h", 1))
    q.add("b", ("h", 2))
    q.add("c", ("h", 3))
    assert q.peers("a") == frozenset()
    assert q.peers("c") == {("h", 3)}


def test_stale_providers_expire_per_key_and_stay_bounded() -> None:
    stale = StaleProviders(ttl=60.0, max_entries=3)
    stale.add("k", ("h", 1), now=100.0)
    stale.add("k", ("h", 2), now=110.0)
    assert stale.peers("k", now=159.0) == {("h", 1), ("h", 2)}
    assert stale.peers("other", now=159.0) == frozenset()
    assert stale.peers("k", now=160.0) == {("h", 2)}  # the first one's 60 s are over
    stale.add("k", ("h", 2), now=165.0)  # answered 404 again: remembered anew
    assert stale.peers("k", now=171.0) == {("h", 2)}
    for port in (3, 4, 5):
        stale.add("x", ("h", port), now=172.0)
    assert len(stale) == 3  # the oldest went first
    assert stale.peers("k", now=172.0) == frozenset()
    assert stale.peers("x", now=172.0) == {("h", 3), ("h", 4), ("h", 5)}
    assert stale.peers("x", now=232.0) == frozenset()
    assert len(stale) == 0


HEADERS = {
    "docker-content-digest": D,
    "content-type": "application/octet-stream",
    "content-length": "100",
}


def test_peer_answer_full_and_ranged() -> None:
    answer = check_peer_answer(
        status=200, headers=HEADERS, expected_digest=D, is_blob=True, is_head=False, requested=None
    )
    assert (answer.size, answer.offset, answer.length) == (100, 0, 100)
    ranged = {**HEADERS, "content-length": "50", "content-range": "bytes 50-99/100"}
    answer = check_peer_answer(
        status=206,
        headers=ranged,
        expected_digest=D,
        is_blob=True,
        is_head=False,
        requested=ByteRange(50, 99, 100),
        expected_size=100,
    )
    assert (answer.size, answer.offset, answer.length) == (100, 50, 50)
    no_digest = {k: v for k, v in HEADERS.items() if k != "docker-content-digest"}
    assert (
        check_peer_answer(
            status=200,
            headers=no_digest,
            expected_digest=D,
            is_blob=True,
            is_head=True,
            requested=None,
        ).length
        == 0
    )


@pytest.mark.parametrize(
    ("status", "headers", "expected", "requested", "size", "message"),
    [
        (500, HEADERS, D, None, None, "answered 500"),
        (200, HEADERS, D, ByteRange(0, 9, 100), None, "range request"),
        (200, {**HEADERS, "docker-content-digest": "sha256:x"}, D, None, None, "bad Docker"),
        (
            200,
            {**HEADERS, "docker-content-digest": "sha256:" + "c" * 64},
            D,
            None,
            None,
            "asked for",
        ),
        (200, {**HEADERS, "content-length": "-1"}, D, None, None, "Content-Length"),
        (
            200,
            {k: v for k, v in HEADERS.items() if k != "content-length"},
            D,
            None,
            None,
            "Content-Length",
        ),
        (
            206,
            {**HEADERS, "content-range": "bytes 0-9/100", "content-length": "10"},
            D,
            ByteRange(10, 19, 100),
            None,
            "other than",
        ),
        (
            206,
            {**HEADERS, "content-range": "bytes 10-19/100", "content-length": "11"},
            D,
            ByteRange(10, 19, 100),
            None,
            "does not match",
        ),
        (
            206,
            {**HEADERS, "content-range": "bytes 19-10/100"},
            D,
            ByteRange(10, 19, 100),
            None,
            "inconsistent",
        ),
        (200, HEADERS, D, None, 99, "another peer"),
        (
            200,
            {k: v for k, v in HEADERS.items() if k != "docker-content-digest"},
            None,
            None,
            None,
            "no Docker-Content-Digest",
        ),
    ],
)
def test_peer_answer_rejections(
    status: int,
    headers: dict[str, str],
    expected: str | None,
    requested: ByteRange | None,
    size: int | None,
    message: str,
) -> None:
    with pytest.raises(PeerAnswerError, match=message):
        check_peer_answer(
            status=status,
            headers=headers,
            expected_digest=expected,
            is_blob=True,
            is_head=False,
            requested=requested,
            expected_size=size,
        )


async def run_forwarder(router: MemoryRouter, settings: MirrorSettings) -> MirrorItem:
    request = ContentRequest(ContentKind.BLOB, Reference("docker.io", "a", digest=D))
    send, receive = trio.open_memory_channel[MirrorItem](4)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            Forwarder(router, settings=settings).run, MirrorJob(request, "GET", None), send
        )
        async with receive:
            return await receive.receive()


async def test_converged_empty_answers_at_once(autojump_clock: trio.abc.Clock) -> None:
    start = trio.current_time()
    item = await run_forwarder(MemoryRouter(), MirrorSettings())
    assert isinstance(item, MirrorFailure)
    assert (item.status, item.code, item.attempts) == (404, ErrorCode.BLOB_UNKNOWN, 0)
    assert item.message == f"could not find peer for {D}"
    assert trio.current_time() - start == 0


@pytest.mark.parametrize(("resolve_timeout", "retries"), [(0.020, 3), (0.05, 2), (0.001, 1)])
async def test_silent_lookup_costs_timeout_times_retries(
    resolve_timeout: float, retries: int, autojump_clock: trio.abc.Clock
) -> None:
    start = trio.current_time()
    router = MemoryRouter(converges=False)
    item = await run_forwarder(
        router, MirrorSettings(resolve_timeout=resolve_timeout, resolve_retries=retries)
    )
    assert isinstance(item, MirrorFailure) and item.attempts == retries
    assert trio.current_time() - start == pytest.approx(resolve_timeout * retries)


async def test_provider_slower_than_all_attempts_is_not_waited_for(
    autojump_clock: trio.abc.Clock,
) -> None:
    network = MemoryNetwork()
    network.add(D, P1)
    router = MemoryRouter(network, lookup_delay=0.07)
    start = trio.current_time()
    item = await run_forwarder(router, MirrorSettings())
    assert isinstance(item, MirrorFailure)
    assert item.message.startswith("waited too long for new peer")
    assert trio.current_time() - start == pytest.approx(0.06)


async def test_peer_client_reuses_connections(nursery: trio.Nursery) -> None:
    connections = 0

    async def hello(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        await answer_each_request(stream, hello)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    client = PeerClient()
    for _ in range(3):
        async with client.request("127.0.0.1", port, "GET", "/x") as response:
            assert response.status == 200
            assert response.headers["content-length"] == "5"
            assert await response.receive() == b"hello"
            assert await response.receive() is None
    assert connections == 1
    await client.aclose()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_peer_client_keeps_the_first_bytes_for_the_reader(
    nursery: trio.Nursery, framing: str
) -> None:
    """`first_bytes` waits for the body to start (a head alone is not enough) and loses nothing:
    the bytes it saw come out of the next reads, and the connection is reused afterwards."""
    go = trio.Event()
    body = b"first" + b"x" * 100_000 + b"last"

    async def head_then_body(stream: trio.SocketStream) -> None:
        if framing == "chunked":
            await stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            await go.wait()
            await stream.send_all(b"5\r\nfirst\r\n")
            rest = body[5:]
            await stream.send_all(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))
        else:
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body))
            await go.wait()
            await stream.send_all(body[:5])
            await trio.sleep(0.01)
            await stream.send_all(body[5:])

    handler = functools.partial(answer_each_request, respond=head_then_body)
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    client = PeerClient()
    for round_ in range(2):
        async with client.request("127.0.0.1", port, "GET", "/x") as response:
            assert response.status == 200
            if round_ == 0:
                with trio.move_on_after(0.05) as waited:
                    await response.first_bytes()
                assert waited.cancelled_caught  # the head alone does not count
                go.set()
            await response.first_bytes()
            await response.first_bytes()  # again: nothing more is read, nothing lost
            parts = []
            while (chunk := await response.receive()) is not None:
                parts.append(bytes(chunk))
            assert b"".join(parts) == body
            assert parts[0].startswith(b"first")
        assert response.complete
    await client.aclose()


async def test_peer_client_errors(nursery: trio.Nursery) -> None:
    async def hang_up(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")

    async def garbage(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"NOT HTTP\r\n\r\n")

    client = PeerClient()
    for handler, phase in ((hang_up, "body"), (garbage, "head")):
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        with pytest.raises(PeerError):
            async with client.request("127.0.0.1", port, "GET", "/x") as response:
                assert phase == "body"
                assert await response.receive() == b"abc"
                await response.receive()
    with pytest.raises(PeerError, match="cannot connect"):
        async with client.request("127.0.0.1", 1, "GET", "/x"):
            pass


async def test_a_response_that_never_reads_is_abandoned(autojump_clock: trio.abc.Clock) -> None:
    request = ContentRequest(ContentKind.BLOB, Reference("docker.io", "a", digest=D))
    send, receive = trio.open_memory_channel[MirrorItem](0)
    forwarder = Forwarder(MemoryRouter(), settings=MirrorSettings(consumer_timeout=7))
    start = trio.current_time()
    async with receive:
        await forwarder.run(MirrorJob(request, "GET", None), send)
    assert trio.current_time() - start == pytest.approx(7)


class BrokenRouter(MemoryRouter):
    @asynccontextmanager
    async def resolve(self, key: str) -> AsyncIterator[AsyncIterator[Peer]]:
        raise RuntimeError("routing table on fire")
        yield  # pragma: no cover


async def test_router_errors_are_500s() -> None:
    item = await run_forwarder(BrokenRouter(), MirrorSettings())
    assert isinstance(item, MirrorFailure)
    assert item.status == 500
    assert "routing table on fire" in item.message
