"""The registry's two seams: where content is (Router) and what this node holds (ContentStore).

Why a module of its own: the registry is built and tested against in-memory doubles of these
(`tests/fakes.py`), while the agent supplies the real ones: the DHT node adapted to a Router
(`agent/peer_router.py`) and a containerd-backed ContentStore. Both are structural
(`typing.Protocol`): the registry imports neither `dht/` nor `agent/`, and `dht/` does not import
the registry.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Peer:
    """A node that advertised a key: where its registry answers."""

    node_id: bytes  # 32-byte DHT node id
    host: str  # IP address literal (v4 or v6, no brackets)
    port: int  # the peer's registry port


@dataclass(frozen=True, slots=True)
class Descriptor:
    """What the local store knows of one piece of content."""

    digest: str  # "sha256:<64 hex>"
    size: int
    media_type: str


class ContentNotFound(LookupError):
    """The content (or tag) is not present in this node's store."""


class Router(Protocol):
    """Peer discovery: advertise what we hold, find who holds a key."""

    def ready(self) -> bool:
        """True once this node can take part in lookups.

        That is: it knows at least one peer, or it is alone by configuration.
        """
        ...

    async def advertise(self, keys: Iterable[str]) -> None:
        """Announce that this node holds `keys` (digests, `registry/repo:tag`); keep doing so."""
        ...

    async def withdraw(self, keys: Iterable[str]) -> None:
        """Stop announcing `keys` and drop our own records of them."""
        ...

    def resolve(self, key: str) -> AbstractAsyncContextManager[AsyncIterator[Peer]]:
        """Find providers of `key`, excluding this node.

        Usage: ``async with router.resolve(key) as peers: async for peer in peers: ...``.
        Peers arrive as they are found; the iteration ends as soon as the lookup has converged
        (at once with no peers when nobody has the key). Leaving the block, or cancelling, stops
        the lookup.
        """
        ...


class BlobReader(Protocol):
    """An opened piece of content, valid only inside the `ContentStore.open` block that made it."""

    @property
    def size(self) -> int: ...

    @property
    def path(self) -> str | None:
        """A local file holding exactly this content, when readable (enables pread/sendfile)."""
        ...

    def read(self, offset: int, length: int) -> AsyncIterator[bytes]:
        """Yield exactly `length` bytes starting at `offset`, in chunks."""
        ...


class ContentStore(Protocol):
    """This node's content, as containerd holds it (read-only)."""

    async def resolve_tag(self, reference: str) -> str:
        """Map `registry/repo:tag` to its top manifest/index digest; ContentNotFound if absent."""
        ...

    async def describe(self, digest: str) -> Descriptor:
        """Size and detected media type of a digest present locally; ContentNotFound if absent."""
        ...

    def open(self, digest: str) -> AbstractAsyncContextManager[BlobReader]:
        """Open a digest for reading; raises ContentNotFound on entry if absent."""
        ...
