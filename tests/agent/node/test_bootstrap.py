"""Bootstrap kinds (static, dns with an injected resolver and the system one, http over loopback)
and the keep-joined loop under a mock clock."""

from __future__ import annotations

import functools
import itertools
import json
import socket

import httpx
import pytest
import trio

from agent.config import HostPort, ListenAddr
from agent.node.bootstrap import (
    BootstrapError,
    DnsBootstrap,
    HttpBootstrap,
    JoinTiming,
    NoBootstrap,
    SelfInfo,
    StaticBootstrap,
    http_get,
    keep_joined,
    parse_id_document,
    pick_seeds,
    system_lookup,
)

ME = SelfInfo(node_id=bytes(range(32)), host="10.0.0.9", port=5001)


async def test_static() -> None:
    peers = [HostPort("10.0.0.1", 5001), HostPort("node-b", 5001)]
    assert await StaticBootstrap(peers).get() == peers


def test_pick_seeds_sorts_numerically_and_caps() -> None:
    addrs = ["10.0.0.10", "10.0.0.9", "10.0.0.100", "10.0.0.2", "10.0.0.9"]
    assert pick_seeds(addrs) == ["10.0.0.2", "10.0.0.9", "10.0.0.10"]


async def test_dns_first_three_per_family() -> None:
    records = {
        socket.AF_INET: ["10.1.0.7", "10.1.0.3", "10.1.0.12", "10.1.0.5"],
        socket.AF_INET6: ["fd00::9", "fd00::1"],
    }
    asked: list[tuple[str, socket.AddressFamily]] = []

    async def lookup(domain: str, family: socket.AddressFamily) -> list[str]:
        asked.append((domain, family))
        return records[family]

    seeds = await DnsBootstrap("spegla-bootstrap.spegla.svc", 5001, lookup).get()
    assert seeds == [
        HostPort(h, 5001) for h in ("10.1.0.3", "10.1.0.5", "10.1.0.7", "fd00::1", "fd00::9")
    ]
    assert {d for d, _ in asked} == {"spegla-bootstrap.spegla.svc"}


async def test_dns_one_family_failing_is_fine_both_is_an_error() -> None:
    async def v4_only(domain: str, family: socket.AddressFamily) -> list[str]:
        if family == socket.AF_INET6:
            raise OSError("no AAAA")
        return ["10.1.0.3"]

    assert await DnsBootstrap("x", 5001, v4_only).get() == [HostPort("10.1.0.3", 5001)]

    async def broken(domain: str, family: socket.AddressFamily) -> list[str]:
        raise OSError("NXDOMAIN")

    with pytest.raises(BootstrapError, match="failed"):
        await DnsBootstrap("x", 5001, broken).get()


async def test_system_lookup_resolves_localhost() -> None:
    assert "127.0.0.1" in await system_lookup("localhost", socket.AF_INET)


async def test_http_serves_id_and_fetches_it(nursery: trio.Nursery) -> None:
    server = HttpBootstrap(SelfInfo(bytes(32), "", 5001), ListenAddr("127.0.0.1", 0), "")
    await nursery.start(server.run)
    url = f"http://127.0.0.1:{server.bound_port}/id"
    status, body, ip = await http_get(url)
    assert status == 200 and ip == "127.0.0.1"
    # No advertised host configured: the address the client reached us on is used.
    assert json.loads(body) == [{"ID": "00" * 32, "Addrs": ["127.0.0.1:5001"]}]
    status, _, _ = await http_get(f"http://127.0.0.1:{server.bound_port}/nope")
    assert status == 404

    client = HttpBootstrap(ME, None, url)
    assert await client.get() == [HostPort("127.0.0.1", 5001)]
    # Our own entry (same id) is skipped.
    same = HttpBootstrap(SelfInfo(bytes(32), "", 5001), None, url)
    assert await same.get() == []


async def test_http_errors_are_bootstrap_errors(nursery: trio.Nursery) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    for listener in listeners:
        await listener.aclose()  # nothing listens there now
    with pytest.raises(BootstrapError):
        await HttpBootstrap(ME, None, f"http://127.0.0.1:{port}/id").get()
    with pytest.raises(BootstrapError):
        await HttpBootstrap(ME, None, "https://127.0.0.1:1/id").get()


def test_parse_id_document_shapes() -> None:
    doc = json.dumps(
        [{"ID": "ab", "Addrs": ["/ip4/10.0.0.1/tcp/5001", "10.0.0.2:6001"]}, {"Addrs": []}]
    ).encode()
    assert parse_id_document(doc, "10.9.9.9", 5001) == [
        ("ab", HostPort("10.0.0.1", 5001)),
        ("ab", HostPort("10.0.0.2", 6001)),
        ("", HostPort("10.9.9.9", 5001)),
    ]
    # Spegel <= v0.7.4 served a single object.
    single = json.dumps({"ID": "cd", "Addrs": ["[fd00::1]:5001"]}).encode()
    assert parse_id_document(single, "", 5001) == [("cd", HostPort("fd00::1", 5001))]
    with pytest.raises(BootstrapError):
        parse_id_document(b"<html>", "", 5001)
    with pytest.raises(BootstrapError):
        parse_id_document(b'["x"]', "", 5001)


async def test_keep_joined_backs_off_until_ready_then_rejoins(
    autojump_clock: trio.abc.Clock,
) -> None:
    joins: list[tuple[float, list[tuple[str, int]]]] = []
    state = {"ready": False}

    async def join(seeds: list[tuple[str, int]]) -> None:
        joins.append((trio.current_time(), seeds))
        if len(joins) >= 4:
            state["ready"] = True

    seeds = StaticBootstrap([HostPort("10.0.0.9", 5001), HostPort("10.0.0.1", 5001)])
    timing = JoinTiming(
        initial_backoff=0.05, max_backoff=10.0, check_interval=5.0, rejoin_interval=1800.0
    )
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(keep_joined, seeds, join, lambda: state["ready"], ME, timing)
        await trio.sleep(100)
        assert len(joins) == 4
        assert all(s == [("10.0.0.1", 5001)] for _, s in joins)  # self skipped
        gaps = [round(b[0] - a[0], 3) for a, b in itertools.pairwise(joins)]
        assert gaps == [0.05, 0.1, 0.2]
        await trio.sleep(1800)
        assert len(joins) == 5  # periodic re-join
        state["ready"] = False  # table emptied: join again promptly
        await trio.sleep(6)
        assert len(joins) >= 6 and joins[5][0] - start < 1906 + 6
        nursery.cancel_scope.cancel()


async def test_keep_joined_survives_failing_bootstrapper(autojump_clock: trio.abc.Clock) -> None:
    calls = 0

    class Failing(NoBootstrap):
        async def get(self) -> list[HostPort]:
            nonlocal calls
            calls += 1
            raise BootstrapError("dns down")

    async def join(seeds: list[tuple[str, int]]) -> None:
        raise AssertionError("no seeds, no join")

    async with trio.open_nursery() as nursery:
        await nursery.start(keep_joined, Failing(), join, lambda: False, ME)
        await trio.sleep(60)
        nursery.cancel_scope.cancel()
    # 50 ms doubling to a 10 s cap: 0.05+0.1+...+6.4 = 12.75 s for 8 rounds, then every 10 s
    assert 10 <= calls <= 14


async def test_http_id_answers_only_get_id(nursery: trio.Nursery) -> None:
    """The `/id` server answers as it always did: GET /id (any query) -> the document, anything
    else -> 404 text."""
    server = HttpBootstrap(ME, ListenAddr("127.0.0.1", 0), "")
    await nursery.start(server.run)
    base = f"http://127.0.0.1:{server.bound_port}"
    status, body, _ = await http_get(f"{base}/id?from=peer")
    assert status == 200 and json.loads(body) == [
        {"ID": ME.node_id.hex(), "Addrs": [str(HostPort(ME.host, ME.port))]}
    ]
    status, body, _ = await http_get(f"{base}/")
    assert (status, body) == (404, b"not found\n")
    async with httpx.AsyncClient() as http:
        posted = await http.post(f"{base}/id", content=b"x")
    assert posted.status_code == 404 and posted.headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize("chunked", [False, True])
async def test_http_get_bounds_the_body(nursery: trio.Nursery, chunked: bool) -> None:
    """An answer larger than `max_body` is refused, whether its length is declared or not."""
    big = b"x" * 5000

    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(65536)
            if chunked:
                head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                body = b"".join(
                    b"%x\r\n%s\r\n" % (len(big[i : i + 1000]), big[i : i + 1000])
                    for i in range(0, 5000, 1000)
                )
                await stream.send_all(head + body + b"0\r\n\r\n")
            else:
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + big)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, answer, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    url = f"http://127.0.0.1:{port}/id"
    with pytest.raises(BootstrapError, match="larger than"):
        await http_get(url, max_body=4096)
    status, body, ip = await http_get(url, max_body=8192)
    assert (status, body, ip) == (200, big, "127.0.0.1")
