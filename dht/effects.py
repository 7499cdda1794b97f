"""What the protocol core asks its driver to do, or tells it: typed, immutable effects.

Why: the core never touches sockets or clocks. Each call returns a list of these; a driver (the Trio
`Node`, or the simulator) performs the `Send`s and routes the lookup results to whoever waits on
them.
"""

from __future__ import annotations

from dataclasses import dataclass

from dht.ids import ProviderInfo
from dht.lookup import LookupStats


@dataclass(frozen=True, slots=True)
class Send:
    addr: tuple[str, int]
    data: bytes


@dataclass(frozen=True, slots=True)
class ProvidersFound:
    lookup_id: int
    providers: tuple[ProviderInfo, ...]


@dataclass(frozen=True, slots=True)
class LookupDone:
    lookup_id: int
    stats: LookupStats


@dataclass(frozen=True, slots=True)
class BootstrapDone:
    job_id: int
    table_size: int


Effect = Send | ProvidersFound | LookupDone | BootstrapDone
