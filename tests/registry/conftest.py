"""Fixtures for registry tests: run apps on loopback (port 0) and scripted misbehaving peers."""

from __future__ import annotations

import functools
import json
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import h11
import httpx
import pytest
import trio

from registry.auth.peer import PeerAuth
from registry.burst.claim_supply import ClaimParticipation
from registry.events import MirrorEvents
from registry.interfaces import Peer
from registry.oci.mediatypes import OCI_INDEX, OCI_MANIFEST
from registry.oci.ranges import parse_range
from registry.serve.app import Registry, RegistrySettings
from registry.serve.connection import AnswerStats
from registry.serve.server import ServerKind, run_registry
from tests.fakes import MemoryContentStore, MemoryNetwork, MemoryRouter, sha256_digest

LOOPBACK = "127.0.0.1"
# the cluster key the keyed test nodes share (registry.auth.peer): tags resolve only between them
CLUSTER_KEY = b"test cluster key: 32 bytes long!"


def with_key(
    settings: RegistrySettings | None = None, key: bytes = CLUSTER_KEY
) -> RegistrySettings:
    """`settings` (default: the defaults) with the cluster key's peer credentials."""
    return replace(settings or RegistrySettings(), peer_auth=PeerAuth(key))


@dataclass
class Node:
    """One registry app on loopback with its store and router."""

    store: MemoryContentStore
    router: MemoryRouter
    port: int
    registry: Registry
    server: ServerKind = "h11"

    @property
    def stats(self) -> AnswerStats:
        """What the app answered (`served`: file bodies sent by the server's zero-copy
        extension, which only our h11 server offers)."""
        return self.registry.stats

    @property
    def peer(self) -> Peer:
        return Peer(node_id=self.port.to_bytes(32, "big"), host=LOOPBACK, port=self.port)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=10)


StartNode = Callable[..., Awaitable[Node]]


@pytest.fixture
def network() -> MemoryNetwork:
    return MemoryNetwork()


# Both servers run the same app: tests where the server matters parametrize this fixture
# (`@pytest.mark.parametrize("registry_server", SERVERS)`); the others run on ours.
SERVERS: tuple[ServerKind, ...] = ("h11", "hypercorn")


@pytest.fixture
def registry_server() -> ServerKind:
    return "h11"


@pytest.fixture
def start_node(
    nursery: trio.Nursery, network: MemoryNetwork, registry_server: ServerKind
) -> StartNode:
    """`await start_node(store, settings=..., router=...)` -> a served Node (its task tree and
    app, on the `registry_server` kind unless `server` says otherwise)."""

    async def start(
        store: MemoryContentStore | None = None,
        *,
        settings: RegistrySettings | None = None,
        router: MemoryRouter | None = None,
        server: ServerKind | None = None,
        events: MirrorEvents | None = None,
        claims: ClaimParticipation | None = None,
    ) -> Node:
        store = store if store is not None else MemoryContentStore()
        router = router if router is not None else MemoryRouter(network)
        registry = Registry(
            store, router, settings or RegistrySettings(), events=events, claims=claims
        )
        kind = server or registry_server
        port = await nursery.start(
            functools.partial(run_registry, registry, LOOPBACK, 0, server=kind)
        )
        node = Node(store, router, port, registry, kind)
        router.self_peer = node.peer
        if claims is not None:
            claims.node_id = node.peer.node_id
        return node

    return start


def manifest_bytes(layers: list[str], config: str) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"digest": config, "size": 2, "mediaType": "x"},
            "layers": [{"digest": d, "size": 1, "mediaType": "y"} for d in layers],
        }
    ).encode()


@dataclass
class Content:
    """A small image's worth of content in a store: config, layer, manifest, index, tag."""

    config: str
    layer: str
    layer_bytes: bytes
    manifest: str
    manifest_bytes: bytes
    index: str
    tag_key: str


def fill(
    store: MemoryContentStore,
    registry: str = "docker.io",
    repo: str = "library/app",
    files: Path | None = None,
) -> Content:
    """Put a small image into `store`, in memory or (with `files`) as files in that directory."""

    def add(data: bytes) -> str:
        if files is None:
            return store.add(data)
        path = files / sha256_digest(data).removeprefix("sha256:")
        path.write_bytes(data)
        return store.add_file(path)

    config = add(json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {}}).encode())
    layer_bytes = bytes(range(256)) * 4096 + b"tail"  # ~1 MiB, not JSON
    layer = add(layer_bytes)
    manifest_data = manifest_bytes([layer], config)
    manifest = add(manifest_data)
    index = add(
        json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [{"digest": manifest}]}
        ).encode()
    )
    tag_key = f"{registry}/{repo}:v1"
    store.tag(tag_key, index)
    return Content(config, layer, layer_bytes, manifest, manifest_data, index, tag_key)


@dataclass
class ScriptedPeer:
    """A raw HTTP peer that misbehaves on purpose.

    behaviour: "500" (answers 500), "429" (busy: at its upload limit), "refuse" (429 saying its
    own download has no source, `registry.burst.own_downloads`), "404" (answers 404: it
    advertised content it no longer holds), "silent" (accepts, never answers), "cut" (announces
    `body` in full but sends only `cut` bytes, then closes), "serve" (serves `body` as `digest`,
    honouring a Range, whatever the bytes are: with wrong bytes it is a lying peer), "mute"
    (sends its head and the first `cut` body bytes, then silence until the requester hangs up,
    which sets `hung_up`), "late" (sends its head, then the body after `pause` seconds).
    """

    behaviour: str
    body: bytes = b""
    digest: str = ""
    media_type: str = "application/octet-stream"
    cut: int = 0
    dies_after: int = 0  # when set: after this many requests it hangs up without an answer
    busy_first: int = 0  # answers its first this many requests busy (429, at its upload limit)
    port: int = 0
    pause: float = 0.0
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    hung_up: trio.Event = field(default_factory=trio.Event)

    @property
    def peer(self) -> Peer:
        return Peer(node_id=(10**6 + self.port).to_bytes(32, "big"), host=LOOPBACK, port=self.port)

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            await self._handle(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the registry under test hung up on us, as it may

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                break
            if isinstance(event, h11.ConnectionClosed):
                return
        headers = {k.decode().lower(): v.decode() for k, v in event.headers}
        self.requests.append((event.method.decode(), event.target.decode(), headers))
        if self.dies_after and len(self.requests) > self.dies_after:
            return  # it died: hangs up on every later request
        if self.behaviour == "429" or len(self.requests) <= self.busy_first:
            await stream.send_all(
                b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 1\r\ncontent-length: 0\r\n\r\n"
            )
            return
        if self.behaviour == "silent":
            await trio.sleep_forever()
        if self.behaviour == "500":
            await stream.send_all(
                b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n"
            )
            return
        if self.behaviour == "refuse":  # its own download of it has no source (own_downloads)
            await stream.send_all(
                b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 1\r\n"
                b"spegla-refused: no-source\r\ncontent-length: 0\r\n\r\n"
            )
            return
        if self.behaviour == "404":
            await stream.send_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
            return
        body, status, extra = self.body, 200, []
        if "range" in headers:
            r = parse_range(headers["range"]).resolve(len(self.body))
            body, status = self.body[r.start : r.end + 1], 206
            extra = [f"content-range: {r.content_range}"]
        head = [
            f"HTTP/1.1 {status} OK",
            f"content-type: {self.media_type}",
            f"docker-content-digest: {self.digest}",
            f"content-length: {len(body)}",
            *extra,
        ]
        payload = ("\r\n".join(head) + "\r\n\r\n").encode()
        if event.method == b"HEAD":
            await stream.send_all(payload)
            return
        if self.behaviour == "cut":
            await stream.send_all(payload + body[: self.cut])
            await trio.sleep(0.01)
            return
        if self.behaviour == "mute":
            await stream.send_all(payload + body[: self.cut])
            while await stream.receive_some(65536):
                pass
            self.hung_up.set()
            return
        if self.behaviour == "late":
            await stream.send_all(payload)
            await trio.sleep(self.pause)
            await stream.send_all(body)
            return
        await stream.send_all(payload + body)


StartScripted = Callable[[ScriptedPeer], Awaitable[ScriptedPeer]]


@pytest.fixture
def start_scripted(nursery: trio.Nursery) -> StartScripted:
    async def start(peer: ScriptedPeer) -> ScriptedPeer:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, peer.handle, 0, host=LOOPBACK)
        )
        peer.port = listeners[0].socket.getsockname()[1]
        return peer

    return start


def unreachable_peer() -> Peer:
    """A loopback port that nobody listens on."""
    sock = socket.socket()
    sock.bind((LOOPBACK, 0))
    port = sock.getsockname()[1]
    sock.close()
    return Peer(node_id=b"\xee" * 32, host=LOOPBACK, port=port)


async def answer_each_request(
    stream: trio.SocketStream, respond: Callable[[trio.SocketStream], Awaitable[None]]
) -> None:
    """A raw HTTP/1.1 server loop: `respond` once per request head (bodiless GETs) until EOF."""
    buffer = b""
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        buffer += data
        while b"\r\n\r\n" in buffer:
            _, buffer = buffer.split(b"\r\n\r\n", 1)
            await respond(stream)
