"""In-memory peers for the mirror's property tests: a peer client whose answers are cut, slow,
frozen or lying at chosen offsets (no sockets, so many Hypothesis cases run fast)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from registry.http.client import PeerError
from registry.interfaces import Peer
from registry.mirror.forwarder import Forwarder
from registry.mirror.job import MirrorSettings
from registry.oci.ranges import parse_range
from tests.fakes import MemoryNetwork, MemoryRouter


@dataclass
class FakePeer:
    data: bytes  # what it serves (differs from the blob: a liar)
    chunk: int  # bytes per receive
    delay: float = 0.0  # seconds per receive (slow)
    cut_at: int | None = None  # absolute offset where its streams break
    frozen_at: int | None = None  # absolute offset where its streams stop sending for good
    ranges: list[tuple[int, int]] = field(default_factory=list)  # requests it answered


class FakeResponse:
    def __init__(self, peer: FakePeer, start: int, end: int, digest: str, ranged: bool) -> None:
        self.status = 206 if ranged else 200
        self.headers = {
            "content-type": "application/octet-stream",
            "docker-content-digest": digest,
            "content-length": str(end - start + 1),
        }
        if ranged:
            self.headers["content-range"] = f"bytes {start}-{end}/{len(peer.data)}"
        self._peer, self._pos, self._end = peer, start, end + 1
        self._pending = b""  # read by `first_bytes`, handed out first

    async def first_bytes(self) -> None:
        """As PeerResponse.first_bytes: wait for the body to start, keep what came."""
        if self._pending or self._pos >= self._end:
            return
        buffer = bytearray(1 << 16)
        n = await self._read_into(memoryview(buffer))
        self._pending = bytes(buffer[:n])

    async def receive_into(self, view: memoryview) -> int:
        if self._pending:
            n = min(len(view), len(self._pending))
            view[:n] = self._pending[:n]
            self._pending = self._pending[n:]
            await trio.lowlevel.checkpoint()
            return n
        return await self._read_into(view)

    async def _read_into(self, view: memoryview) -> int:
        peer = self._peer
        if peer.delay:
            await trio.sleep(peer.delay)
        else:
            await trio.lowlevel.checkpoint()
        if self._pos >= self._end:
            return 0
        if peer.frozen_at is not None and self._pos >= peer.frozen_at:
            await trio.sleep_forever()
        if peer.cut_at is not None and self._pos >= peer.cut_at:
            raise PeerError("cut")
        stop = min(self._end, self._pos + peer.chunk, self._pos + len(view))
        for limit in (peer.cut_at, peer.frozen_at):
            if limit is not None and limit > self._pos:
                stop = min(stop, limit)
        n = stop - self._pos
        view[:n] = peer.data[self._pos : stop]
        self._pos = stop
        return n

    async def receive(self) -> bytes | None:
        buffer = bytearray(1 << 16)
        n = await self.receive_into(memoryview(buffer))
        return bytes(buffer[:n]) if n else None


class FakeClient:
    def __init__(self, peers: dict[int, FakePeer], digest: str) -> None:
        self.peers, self.digest = peers, digest

    @asynccontextmanager
    async def request(
        self,
        host: str,
        port: int,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        *,
        also: tuple[str, ...] = (),
    ) -> AsyncIterator[FakeResponse]:
        peer = self.peers[port]
        size = len(peer.data)
        ranged = dict(headers).get("Range")
        start, end = 0, size - 1
        if ranged:
            r = parse_range(ranged).resolve(size)
            start, end = r.start, r.end
        peer.ranges.append((start, end))
        yield FakeResponse(peer, start, end, self.digest, ranged is not None)


def forwarder_over(digest: str, peers: list[FakePeer], settings: MirrorSettings) -> Forwarder:
    """A forwarder whose router knows `peers` (ports 1, 2, ...: port 0 is no peer's) as
    providers of `digest` and whose peer client is `FakeClient`."""
    network = MemoryNetwork()
    for port in range(1, len(peers) + 1):
        network.add(digest, Peer(bytes([port]) * 32, "127.0.0.1", port))
    client = FakeClient(dict(enumerate(peers, start=1)), digest)
    return Forwarder(MemoryRouter(network), client, settings)  # type: ignore[arg-type]
