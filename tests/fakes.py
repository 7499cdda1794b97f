"""Test doubles: in-memory `Router` and `ContentStore` for tests and benches of registry and agent.

Why: the registry's behaviour (local serving, mirroring, fail-over) is tested without a DHT or a
containerd.  `MemoryNetwork` is a shared "DHT" several nodes' `MemoryRouter`s use; lookups yield
the providers known when they start and then converge, optionally slowly or never (to exercise the
resolve deadlines).  `MemoryContentStore` holds blobs in memory or as files (so the zero-copy path
is exercised too) and can be loaded from an OCI image layout directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import trio

from registry.interfaces import ContentNotFound, Descriptor, Peer, PeerState
from registry.oci.mediatypes import SNIFF_LIMIT, detect_media_type
from registry.oci.reference import parse_digest, sha256_digest, validate_tag

__all__ = ["MemoryContentStore", "MemoryNetwork", "MemoryRouter", "sha256_digest"]

READ_CHUNK = 1024 * 1024


class MemoryNetwork:
    """Who provides which key, shared by every `MemoryRouter` made from it."""

    def __init__(self) -> None:
        self._providers: dict[str, dict[bytes, Peer]] = {}

    def router(self, peer: Peer, *, ready: bool = True) -> MemoryRouter:
        return MemoryRouter(self, peer, ready=ready)

    def providers(self, key: str) -> list[Peer]:
        return list(self._providers.get(key, {}).values())

    def add(self, key: str, peer: Peer) -> None:
        self._providers.setdefault(key, {})[peer.node_id] = peer

    def remove(self, key: str, peer: Peer) -> None:
        self._providers.get(key, {}).pop(peer.node_id, None)


class _Lookup:
    """Async iterator over a snapshot of providers, with an optional delay and non-convergence."""

    def __init__(self, peers: list[Peer], delay: float, converges: bool) -> None:
        self._peers = peers
        self._delay = delay
        self._converges = converges

    def __aiter__(self) -> _Lookup:
        return self

    async def __anext__(self) -> Peer:
        if self._peers:
            if self._delay > 0:
                await trio.sleep(self._delay)
            else:
                await trio.lowlevel.checkpoint()
            return self._peers.pop(0)
        if not self._converges:
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()
        raise StopAsyncIteration


class MemoryRouter:
    """A `Router` over a `MemoryNetwork`; `lookup_delay` and `converges` shape its lookups."""

    def __init__(
        self,
        network: MemoryNetwork | None = None,
        self_peer: Peer | None = None,
        *,
        ready: bool = True,
        lookup_delay: float = 0.0,
        converges: bool = True,
    ) -> None:
        self.network = network if network is not None else MemoryNetwork()
        self.self_peer = self_peer
        self.lookup_delay = lookup_delay
        self.converges = converges
        self.resolved: list[str] = []
        self._ready = ready
        self._advertised: dict[str, PeerState] = {}

    def ready(self) -> bool:
        return self._ready

    def set_ready(self, ready: bool) -> None:
        self._ready = ready

    @property
    def advertised(self) -> frozenset[str]:
        return frozenset(self._advertised)

    def state(self, key: str) -> PeerState | None:
        """The state `key` is advertised with by this router; None when not advertised."""
        return self._advertised.get(key)

    async def advertise(self, keys: Iterable[str], state: PeerState = PeerState.COMPLETE) -> None:
        for key in keys:
            self._advertised[key] = state
            if self.self_peer is not None:
                self.network.add(key, replace(self.self_peer, state=state))
        await trio.lowlevel.checkpoint()

    async def withdraw(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._advertised.pop(key, None)
            if self.self_peer is not None:
                self.network.remove(key, self.self_peer)
        await trio.lowlevel.checkpoint()

    @asynccontextmanager
    async def resolve(self, key: str) -> AsyncIterator[AsyncIterator[Peer]]:
        self.resolved.append(key)
        own = None if self.self_peer is None else self.self_peer.node_id
        peers = [p for p in self.network.providers(key) if p.node_id != own]
        yield _Lookup(peers, self.lookup_delay, self.converges)


@dataclass(frozen=True, slots=True)
class _Blob:
    size: int
    media_type: str | None  # None: JSON of unknown shape, described as not found
    data: bytes | None
    path: str | None


class _Reader:
    def __init__(self, blob: _Blob) -> None:
        self._blob = blob

    @property
    def size(self) -> int:
        return self._blob.size

    @property
    def path(self) -> str | None:
        return self._blob.path

    async def read(self, offset: int, length: int) -> AsyncIterator[bytes]:
        if offset < 0 or length < 0 or offset + length > self._blob.size:
            raise ValueError(f"read of {length} bytes at {offset} outside {self._blob.size}")
        if self._blob.data is not None:
            view = memoryview(self._blob.data)
            end = offset + length
            while offset < end:
                step = min(READ_CHUNK, end - offset)
                yield bytes(view[offset : offset + step])
                offset += step
                await trio.lowlevel.checkpoint()
            return
        assert self._blob.path is not None
        fd = os.open(self._blob.path, os.O_RDONLY)
        try:
            while length > 0:
                chunk = await trio.to_thread.run_sync(os.pread, fd, min(READ_CHUNK, length), offset)
                if not chunk:
                    raise OSError(f"{self._blob.path} is shorter than expected")
                yield chunk
                offset += len(chunk)
                length -= len(chunk)
        finally:
            os.close(fd)


class MemoryContentStore:
    """A `ContentStore` of blobs in memory or in files, and tags `registry/repo:tag` -> digest."""

    def __init__(self) -> None:
        self._blobs: dict[str, _Blob] = {}
        self._tags: dict[str, str] = {}

    # --- filling -----------------------------------------------------------------------------
    def add(self, data: bytes, *, digest: str | None = None) -> str:
        """Store `data`; `digest` overrides the computed one (to make a lying node in tests)."""
        key = parse_digest(digest) if digest is not None else sha256_digest(data)
        self._blobs[key] = _Blob(len(data), _detect(len(data), data), data, None)
        return key

    def add_file(self, path: str | os.PathLike[str], *, digest: str | None = None) -> str:
        """Serve the file at `path` (read lazily); its digest is computed unless given."""
        file_path = os.fspath(path)
        size = os.stat(file_path).st_size
        if digest is None:
            hasher = hashlib.sha256()
            with open(file_path, "rb") as handle:
                while chunk := handle.read(READ_CHUNK * 4):
                    hasher.update(chunk)
            digest = "sha256:" + hasher.hexdigest()
        head = None
        if size <= SNIFF_LIMIT:
            with open(file_path, "rb") as handle:
                head = handle.read()
        self._blobs[parse_digest(digest)] = _Blob(size, _detect(size, head), None, file_path)
        return digest

    def tag(self, reference: str, digest: str) -> None:
        self._tags[reference] = parse_digest(digest)

    def untag(self, reference: str) -> None:
        self._tags.pop(reference, None)

    def remove(self, digest: str) -> None:
        self._blobs.pop(digest, None)

    def digests(self) -> frozenset[str]:
        return frozenset(self._blobs)

    @classmethod
    def from_oci_layout(cls, layout: str | os.PathLike[str], name: str) -> MemoryContentStore:
        """Load an OCI image layout; each `index.json` entry's ref name tags `name:<ref>`.

        `name` is `registry/repository`.  Blobs stay on disk and are served from their files.
        """
        store = cls()
        store.load_oci_layout(layout, name)
        return store

    def load_oci_layout(self, layout: str | os.PathLike[str], name: str) -> None:
        root = Path(layout)
        blob_dir = root / "blobs" / "sha256"
        for entry in sorted(blob_dir.iterdir()):
            self.add_file(entry, digest=f"sha256:{entry.name}")
        index = json.loads((root / "index.json").read_text())
        for descriptor in index.get("manifests", []):
            ref = descriptor.get("annotations", {}).get("org.opencontainers.image.ref.name")
            if ref:
                self.tag(f"{name}:{validate_tag(ref)}", descriptor["digest"])

    # --- ContentStore --------------------------------------------------------------------------
    async def resolve_tag(self, reference: str) -> str:
        await trio.lowlevel.checkpoint()
        try:
            return self._tags[reference]
        except KeyError:
            raise ContentNotFound(reference) from None

    async def describe(self, digest: str) -> Descriptor:
        await trio.lowlevel.checkpoint()
        blob = self._blobs.get(digest)
        if blob is None or blob.media_type is None:
            raise ContentNotFound(digest)
        return Descriptor(digest=digest, size=blob.size, media_type=blob.media_type)

    @asynccontextmanager
    async def open(self, digest: str) -> AsyncIterator[_Reader]:
        await trio.lowlevel.checkpoint()
        blob = self._blobs.get(digest)
        if blob is None:
            raise ContentNotFound(digest)
        yield _Reader(blob)


def _detect(size: int, head: bytes | None) -> str | None:
    try:
        return detect_media_type(size, head)
    except ValueError:
        return None
