"""The registry's two seams: where content is (Router) and what this node holds (ContentStore).

Why a module of its own: the registry is built and tested against in-memory doubles of these
(`tests/fakes.py`), while the agent supplies the real ones: the DHT node adapted to a Router
(`agent/advertising/peer_router.py`) and a containerd-backed ContentStore. Both are structural
(`typing.Protocol`): the registry imports neither `dht/` nor `agent/`, and `dht/` does not import
the registry.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from enum import Enum
from typing import Protocol, runtime_checkable


class PeerState(Enum):
    """What a provider's record says about its copy of a key.

    COMPLETE: it holds the content. INFLIGHT: it is receiving the content right now and serves what
    has arrived (full size announced, bytes as they land; a reader verifies, and may have to wait or
    resume elsewhere). CLAIM: it is about to fetch the content from upstream; it serves nothing yet.
    """

    COMPLETE = "complete"
    INFLIGHT = "inflight"
    CLAIM = "claim"


@dataclass(frozen=True, slots=True)
class Peer:
    """A node that advertised a key: where its registry answers, and its record's state."""

    node_id: bytes  # 32-byte DHT node id
    host: str  # IP address literal (v4 or v6, no brackets)
    port: int  # the peer's registry port
    state: PeerState = PeerState.COMPLETE
    # other addresses of the same node (dual-stack, a second interface): a new connection races
    # them with `host` (`registry.http.dial`); the peer is still told apart by `host` and `port`
    more_hosts: tuple[str, ...] = ()

    @property
    def hosts(self) -> tuple[str, ...]:
        """Every address of the peer, `host` first."""
        return (self.host, *self.more_hosts)


@dataclass(frozen=True, slots=True)
class Descriptor:
    """What the local store knows of one piece of content."""

    digest: str  # "sha256:<64 hex>"
    size: int
    media_type: str


@dataclass(frozen=True, slots=True)
class IngestFile:
    """A blob this node is still downloading: where its bytes land, and where they end up."""

    digest: str  # "sha256:<64 hex>"
    size: int  # the full size the download expects
    data_path: str  # the growing file
    blob_path: str  # the file it becomes once committed (same inode: a rename)


class ContentNotFound(LookupError):
    """The content (or tag) is not present in this node's store."""


class Router(Protocol):
    """Peer discovery: advertise what we hold, find who holds a key."""

    def ready(self) -> bool:
        """True once this node can take part in lookups.

        That is: it knows at least one peer, or it is alone by configuration.
        """
        ...

    async def advertise(self, keys: Iterable[str], state: PeerState = PeerState.COMPLETE) -> None:
        """Announce `keys` (digests, `registry/repo:tag`) with `state`; keep doing so.

        A key already advertised with another state switches to `state` and is re-announced at
        once (e.g. INFLIGHT -> COMPLETE when a download is committed). In-flight and claim records
        live shorter than complete ones (refreshed more often), so they lapse soon after a node
        dies.
        """
        ...

    async def withdraw(self, keys: Iterable[str]) -> None:
        """Stop announcing `keys` and drop our own records of them.

        Nodes that hold an in-flight or claim record of ours for a key are told to drop it at
        once; complete records elsewhere lapse with their ttl.
        """
        ...

    def resolve(self, key: str) -> AbstractAsyncContextManager[AsyncIterator[Peer]]:
        """Find providers of `key`, excluding this node.

        Usage: ``async with router.resolve(key) as peers: async for peer in peers: ...``.
        Peers arrive as they are found, each with the state of its record; a peer may come again
        later with a better state (COMPLETE over INFLIGHT over CLAIM). The iteration ends as soon
        as the lookup has converged (at once with no peers when nobody has the key). Leaving the
        block, or cancelling, stops the lookup.
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


@runtime_checkable
class DownloadDiscarder(Protocol):
    """Optional face of a ContentStore: drop this node's own download of a digest."""

    async def discard_download(self, digest: str) -> None:
        """Abort the download in progress (its partial data was fed bad bytes); never raises."""
        ...


@runtime_checkable
class KnowsAbsence(Protocol):
    """Optional face of a ContentStore: a cheap "certainly not held" (no round trip)."""

    def surely_absent(self, digest: str) -> bool:
        """True only when the store's own files say `digest` is not held; False when unsure.
        May be wrong where the agent sees the files differently from containerd, so only
        requests that can fall back to peers use it (never a peer's request)."""
        ...


@runtime_checkable
class InflightSource(Protocol):
    """Optional face of a ContentStore: the blobs this node is still downloading."""

    def find_inflight(self, digest: str) -> IngestFile | None:
        """The download of `digest` in progress, or None."""
        ...


class ClaimBoard(Protocol):
    """Where this node says it is about to fetch a digest from upstream (a CLAIM record).

    The agent's advertiser implements it: it merges claims with what the node holds or is
    downloading, so a claim never hides a better record of the same key.
    """

    async def claim(self, digest: str) -> None: ...

    async def unclaim(self, digest: str) -> None: ...
