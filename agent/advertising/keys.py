"""`spegla keys`: print the keys this node would advertise, one per line, sorted.

Why: a debugging aid for users ("why does no peer find my image?") and a check of the state
tracker: it runs exactly the tracker's full sync (list, walk, filters) against a no-op router and
prints the result, without joining any cluster.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from agent.advertising.state import StateTracker
from agent.containerd.client import open_containerd
from registry.oci.filters import ReferenceFilter


class _CollectingRouter:
    """A Router that only remembers what it was told (no network)."""

    def __init__(self) -> None:
        self.keys: set[str] = set()

    def ready(self) -> bool:
        return True

    async def advertise(self, keys: Iterable[str]) -> None:
        self.keys.update(keys)

    async def withdraw(self, keys: Iterable[str]) -> None:
        self.keys.difference_update(keys)

    def resolve(self, key: str) -> object:  # never called by the tracker
        raise NotImplementedError


async def collect_keys(
    socket_path: str,
    namespace: str,
    mirrored_registries: Sequence[str] = (),
    registry_filters: Sequence[str] = (),
) -> list[str]:
    """The sorted keys a tracker would advertise for this containerd namespace and these filters.

    Raises ValueError for bad filter configuration, ContainerdUnavailable when containerd cannot
    be reached.
    """
    filters = ReferenceFilter.from_config(mirrored_registries, registry_filters)
    async with open_containerd(socket_path, namespace) as client:
        router = _CollectingRouter()
        tracker = StateTracker(client, router, filters=filters)  # type: ignore[arg-type]
        await tracker.sync()
        return tracker.keys()
