"""A store that can tell "certainly not here" cheaply spares this node's own misses and mirrored
GETs its round trip; a peer's request still asks the store (the agent may see containerd's files
differently from containerd, and a peer must not be refused content this node holds)."""

from __future__ import annotations

import httpx

from registry.interfaces import Descriptor
from tests.fakes import MemoryContentStore, MemoryNetwork, sha256_digest
from tests.registry.conftest import StartNode

BLOB = b"held, but the agent cannot see its file" * 100
DIGEST = sha256_digest(BLOB)
PATH = f"/v2/library/app/blobs/{DIGEST}?ns=docker.io"


class BlindStore(MemoryContentStore):
    """Holds the blob, but its file view says nothing is there; counts the store's lookups."""

    def __init__(self) -> None:
        super().__init__()
        self.add(BLOB)
        self.lookups = 0

    def surely_absent(self, digest: str) -> bool:
        return True

    async def describe(self, digest: str) -> Descriptor:
        self.lookups += 1
        return await super().describe(digest)


async def test_a_peer_is_served_what_the_file_view_misses(
    start_node: StartNode, network: MemoryNetwork
) -> None:
    store = BlindStore()
    node = await start_node(store)
    async with httpx.AsyncClient(base_url=node.url, timeout=10) as http:
        peer = await http.get(PATH, headers={"X-Spegel-Mirrored": "true"})
        assert (peer.status_code, peer.content == BLOB) == (200, True)
        asked = store.lookups
        assert asked >= 1
        own = await http.get(PATH)  # this node's own request: not held as far as it knows
    assert own.status_code == 404  # no peer has it either (a real containerd would go upstream)
    assert store.lookups == asked  # no round trip to the store for it
