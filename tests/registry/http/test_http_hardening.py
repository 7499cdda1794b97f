"""The registry's HTTP side against hostile clients (issue 17): bounded metric labels, credentials
checked before admission, X-Forwarded-For only from trusted proxies, a connection cap, a send
deadline that frees a never-reading client's upload slot and file, and a mirrored request whose
client left stopping its peer fetch.  Real sockets on loopback; each attack's effect is measured.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
import os
import socket
from pathlib import Path

import pytest
import trio
from prometheus_client import REGISTRY, generate_latest

from registry.auth.basic import BasicAuth
from registry.http.server import ConnectionLimits, ServerStats
from registry.interfaces import Peer
from registry.metrics import METHODS, method_label, registry_label
from registry.mirror.job import MirrorSettings
from registry.serve.access_log import client_ip, parse_trusted_proxies
from registry.serve.app import Registry, RegistrySettings
from registry.serve.server import run_registry
from tests.fakes import MemoryContentStore, MemoryNetwork, MemoryRouter, sha256_digest
from tests.registry.conftest import LOOPBACK, SERVERS, StartNode, fill

FAST = MirrorSettings(resolve_timeout=0.5, response_timeout=1.0, stall_timeout=1.0)
AUTH = BasicAuth("spegla", "s3cret")


async def raw_exchange(port: int, request: bytes, *, limit: int = 1 << 16) -> bytes:
    """Send `request` on a new connection; what the server sent until it closed or went quiet."""
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    async with stream:
        await stream.send_all(request)
        answer = b""
        with trio.move_on_after(2):
            while len(answer) < limit and (data := await stream.receive_some(65536)):
                answer += data
                if b"\r\n\r\n" in answer and b"content-length: 0" in answer.lower():
                    break
    return answer


# --- labels -------------------------------------------------------------------------------------


def test_label_values_come_from_fixed_sets() -> None:
    assert method_label("GET") == "GET" and method_label("HEAD") == "HEAD"
    assert method_label("X" * 8000) == "other" and method_label("get") == "other"
    assert registry_label("docker.io") == "docker.io"
    assert registry_label("evil-1234.example") == "other"
    assert "other" not in METHODS


async def test_a_flood_of_invented_methods_leaves_metrics_small(start_node: StartNode) -> None:
    node = await start_node()
    before = len(generate_latest(REGISTRY))
    sent = []
    for i in range(150):
        method = f"M{i:04d}".encode() + b"X" * 8000  # a token: h11 takes it
        answer = await raw_exchange(node.port, method + b" /v2/ HTTP/1.1\r\nhost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 404"), answer[:80]
        sent.append(method)
    labels = {"handler": "/v2/*", "method": "other", "code": "404"}
    with trio.fail_after(5):  # the app records a request just after its answer went out
        while (REGISTRY.get_sample_value("http_request_duration_seconds_count", labels) or 0) < 150:  # noqa: ASYNC110
            await trio.sleep(0.01)
    body = generate_latest(REGISTRY)
    # the attacker sent 150 distinct 8 KB methods (1.2 MB); none of them became a label value
    assert sum(map(len, sent)) > 1_000_000
    assert b"XXXXXXXX" not in body
    assert len(body) - before < 16 * 1024
    other = REGISTRY.get_sample_value(
        "http_request_duration_seconds_count",
        {"handler": "/v2/*", "method": "other", "code": "404"},
    )
    assert other is not None and other >= 150


async def test_mirror_counters_bound_the_registry_label(start_node: StartNode) -> None:
    node = await start_node(settings=RegistrySettings(mirror=FAST))
    missing = "sha256:" + "7" * 64
    before = REGISTRY.get_sample_value(
        "spegel_mirror_requests_total", {"registry": "other", "cache": "miss"}
    )
    async with node.client() as http, trio.open_nursery() as nursery:
        for i in range(4):  # four invented registries, asked at once
            url = f"/v2/a/blobs/{missing}?ns=evil-{i}.example"
            nursery.start_soon(http.get, url)
    after = REGISTRY.get_sample_value(
        "spegel_mirror_requests_total", {"registry": "other", "cache": "miss"}
    )
    assert (after or 0) - (before or 0) == 4
    assert b"evil-" not in generate_latest(REGISTRY)


# --- who is the client --------------------------------------------------------------------------


def test_forwarded_for_is_ignored_unless_the_peer_is_a_trusted_proxy() -> None:
    proxies = parse_trusted_proxies("10.0.0.0/24, 127.0.0.1")
    assert proxies == (ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("127.0.0.1/32"))
    header = "10.9.8.7, 10.0.0.1"
    assert client_ip(header, "192.168.5.5") == "192.168.5.5"  # nobody trusted: the header is noise
    assert client_ip(header, "192.168.5.5", proxies) == "192.168.5.5"  # not from a proxy
    # from a trusted proxy: read from the right, past every trusted hop
    assert client_ip(header, "127.0.0.1", proxies) == "10.9.8.7"
    assert client_ip("1.2.3.4, 10.9.8.7", "127.0.0.1", proxies) == "10.9.8.7"  # left: unverified
    assert client_ip("garbage", "127.0.0.1", proxies) == "127.0.0.1"
    assert client_ip(header, "::ffff:127.0.0.1", proxies) == "10.9.8.7"
    with pytest.raises(ValueError, match="not an IP address"):
        parse_trusted_proxies("10.0.0.0/24,nonsense")


# --- credentials before admission ---------------------------------------------------------------


@pytest.mark.parametrize("registry_server", SERVERS)
async def test_no_refusal_oracle_without_credentials(start_node: StartNode) -> None:
    node = await start_node(settings=RegistrySettings(basic_auth=AUTH, peer_upload_limit=1))
    digest = "sha256:" + "5" * 64
    assert node.registry.uploads.try_acquire(digest)  # the one upload slot is busy with this blob
    peer_get = f"/v2/a/blobs/{digest}?ns=docker.io"
    async with node.client() as http:
        anonymous = await http.get(peer_get, headers={"X-Spegel-Mirrored": "true"})
        allowed = await http.get(
            peer_get, headers={"X-Spegel-Mirrored": "true", "Authorization": AUTH.header_value}
        )
    # the attacker learns nothing but "credentials needed"; a peer with them is told "busy"
    assert anonymous.status_code == 401 and "retry-after" not in anonymous.headers
    assert allowed.status_code == 429 and allowed.headers["retry-after"] == "1"


# --- connection cap and send deadline -----------------------------------------------------------


async def serve(
    nursery: trio.Nursery, store: MemoryContentStore, limits: ConnectionLimits, **settings: object
) -> tuple[int, ServerStats, Registry]:
    registry = Registry(store, MemoryRouter(MemoryNetwork()), RegistrySettings(**settings))  # type: ignore[arg-type]
    stats = ServerStats()
    port = await nursery.start(
        functools.partial(run_registry, registry, LOOPBACK, 0, stats=stats, limits=limits)
    )
    return port, stats, registry


async def test_connections_beyond_the_cap_get_a_clean_503(nursery: trio.Nursery) -> None:
    port, stats, _ = await serve(nursery, MemoryContentStore(), ConnectionLimits(max_connections=2))
    held = [await trio.open_tcp_stream(LOOPBACK, port) for _ in range(2)]
    for stream in held:  # each is being served (answered once, kept alive)
        await stream.send_all(b"GET /v2/ HTTP/1.1\r\nhost: x\r\n\r\n")
        assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200")
    refused = await raw_exchange(port, b"GET /v2/ HTTP/1.1\r\nhost: x\r\n\r\n")
    assert refused.startswith(b"HTTP/1.1 503 ")
    assert b"retry-after: 1\r\n" in refused and b"connection: close\r\n" in refused
    assert stats.refused == 1
    await held.pop().aclose()
    hello = b"GET /v2/ HTTP/1.1\r\nhost: x\r\n\r\n"
    with trio.fail_after(5):  # once one closed, a new connection is served again
        while not (await raw_exchange(port, hello)).startswith(b"HTTP/1.1 200"):  # noqa: ASYNC110
            await trio.sleep(0.02)
    for stream in held:
        await stream.aclose()


def open_descriptors_of(path: Path) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                count += 1
        except OSError:
            pass
    return count


async def test_a_client_that_never_reads_is_cut_and_frees_its_slot_and_file(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    data = os.urandom(1 << 20) * 32  # 32 MiB: far more than the socket buffers hold
    path = tmp_path / "blob"
    path.write_bytes(data)
    store = MemoryContentStore()
    digest = store.add_file(path)
    limits = ConnectionLimits(send_timeout=0.5)
    port, _, registry = await serve(nursery, store, limits, peer_upload_limit=1)
    uploads = registry.uploads
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((LOOPBACK, port))
    request = f"GET /v2/a/blobs/{digest}?ns=docker.io HTTP/1.1\r\nhost: x\r\n"
    await sock.send((request + "x-spegel-mirrored: true\r\n\r\n").encode())
    with trio.fail_after(5):  # the upload is under way: file open, the one slot taken
        while open_descriptors_of(path) == 0:  # noqa: ASYNC110
            await trio.sleep(0.01)
    assert not uploads.try_acquire(digest)
    # ... and the client reads nothing: after the send deadline the server lets go
    with trio.fail_after(10):
        while open_descriptors_of(path) or not uploads.try_acquire(digest):  # noqa: ASYNC110
            await trio.sleep(0.05)
    uploads.release(digest)
    received = 0
    with trio.move_on_after(2):
        while chunk := await sock.recv(1 << 20):
            received += len(chunk)
    sock.close()
    assert received < len(data)  # the connection was cut, not finished


# --- a mirrored request whose client left -------------------------------------------------------


class TricklingPeer:
    """A peer that serves a blob slowly (64 KiB every 20 ms) and notes when its requester hangs
    up and how much it had sent by then."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.digest = sha256_digest(body)
        self.port = 0
        self.sent = 0
        self.started = trio.Event()
        self.hung_up = trio.Event()

    @property
    def peer(self) -> Peer:
        return Peer(node_id=b"\x77" * 32, host=LOOPBACK, port=self.port)

    async def handle(self, stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            data = await stream.receive_some(65536)
            if not data:
                return
            request += data
        head = (
            f"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
            f"docker-content-digest: {self.digest}\r\ncontent-length: {len(self.body)}\r\n\r\n"
        )
        try:
            await stream.send_all(head.encode())
            while self.sent < len(self.body):
                await stream.send_all(self.body[self.sent : self.sent + 65536])
                self.sent += 65536
                self.started.set()
                await trio.sleep(0.02)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.hung_up.set()


async def test_a_mirrored_request_whose_client_left_stops_its_peer_fetch(
    start_node: StartNode, network: MemoryNetwork, nursery: trio.Nursery
) -> None:
    peer = TricklingPeer(os.urandom(32 << 20))  # would take ~10 s to trickle in full
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, peer.handle, 0, host=LOOPBACK)
    )
    peer.port = listeners[0].socket.getsockname()[1]
    network.add(peer.digest, peer.peer)
    node = await start_node(settings=RegistrySettings(mirror=FAST))
    stream = await trio.open_tcp_stream(LOOPBACK, node.port)
    target = f"/v2/a/blobs/{peer.digest}?ns=docker.io"
    await stream.send_all(f"GET {target} HTTP/1.1\r\nhost: x\r\nrange: bytes=-1\r\n\r\n".encode())
    with trio.fail_after(5):
        await peer.started.wait()
    assert not peer.hung_up.is_set()
    await stream.aclose()  # the client leaves before its one byte could be known
    with trio.fail_after(3):
        await peer.hung_up.wait()
    assert peer.sent < len(peer.body)
    assert hashlib.sha256(peer.body).hexdigest() == peer.digest.removeprefix("sha256:")


async def test_forwarded_for_from_a_trusted_proxy_names_the_logged_client(
    start_node: StartNode, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="registry.access")
    store = MemoryContentStore()
    content = fill(store, files=tmp_path)
    trusted = parse_trusted_proxies("127.0.0.0/8")
    node = await start_node(store, settings=RegistrySettings(trusted_proxies=trusted))
    forwarded = {"X-Forwarded-For": "10.9.8.7"}
    async with node.client() as http:
        assert (await http.get("/v2/", headers=forwarded)).status_code == 200  # the app
        blob = await http.get(f"/v2/a/blobs/{content.layer}?ns=docker.io", headers=forwarded)
        assert blob.status_code == 200  # a file body (zero-copy sends)
    with trio.fail_after(5):
        while len([r for r in caplog.records if r.name == "registry.access"]) < 2:  # noqa: ASYNC110
            await trio.sleep(0.01)
    lines = {r.handler: r.ip for r in caplog.records if r.name == "registry.access"}  # type: ignore[attr-defined]
    assert lines == {"v2": "10.9.8.7", "blob": "10.9.8.7"}


async def test_a_slow_but_steady_reader_is_not_cut(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The send deadline bounds each wait for the client, not the whole body: a client that
    reads a little at a time, for longer than the deadline in all, gets every byte."""
    data = os.urandom(2 << 20)
    path = tmp_path / "blob"
    path.write_bytes(data)
    store = MemoryContentStore()
    digest = store.add_file(path)
    port, _, _ = await serve(nursery, store, ConnectionLimits(send_timeout=1.0))
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    await sock.connect((LOOPBACK, port))
    await sock.send(f"GET /v2/a/blobs/{digest}?ns=docker.io HTTP/1.1\r\nhost: x\r\n\r\n".encode())
    received = bytearray()
    started = trio.current_time()
    expected: int | None = None  # head and body, once the head is here
    with trio.fail_after(60):
        while expected is None or len(received) < expected:
            chunk = await sock.recv(64 * 1024)
            assert chunk, "the server closed the connection early"
            received += chunk
            if expected is None and b"\r\n\r\n" in received:
                expected = received.index(b"\r\n\r\n") + 4 + len(data)
            await trio.sleep(0.02)  # a few KiB per 20 ms: seconds for the whole body
    sock.close()
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == data
    assert trio.current_time() - started > 1.0  # it did take longer than the deadline
