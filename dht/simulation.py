"""An in-memory datagram network that drives the real protocol core, for tests and the 5000-node
bench.

Why: what we claim about lookups at scale must come from the code that runs in production. Each
simulated node is a `DhtProtocol`; datagrams between them are delayed by a latency distribution,
lost with some probability, and vanish when sent to (or from) a dead node. Time is a discrete-event
clock: `run_until` jumps from event to event as fast as the CPU allows, and `run_trio` does the same
but sleeps on Trio's clock between events, so it runs inside tests under `trio.testing.MockClock`.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import cast

import trio

from dht.effects import BootstrapDone, Effect, LookupDone, ProvidersFound, Send
from dht.ids import ProviderInfo, RecordState, random_node_id
from dht.lookup import LookupStats
from dht.protocol import DhtProtocol, ProtocolConfig

Addr = tuple[str, int]
DHT_PORT = 5001


def lognormal_latency(
    median: float = 0.0003, sigma: float = 0.5
) -> Callable[[random.Random], float]:
    """One-way delay: log-normal around `median` seconds (a same-zone LAN by default)."""
    mu = math.log(median)
    return lambda rng: rng.lognormvariate(mu, sigma)


@dataclass(slots=True)
class ResolveResult:
    key: str
    started: float
    providers: list[ProviderInfo] = field(default_factory=list)
    first_provider_at: float | None = None
    stats: LookupStats | None = None
    done_at: float | None = None


@dataclass(slots=True)
class SimNode:
    addr: Addr
    protocol: DhtProtocol
    alive: bool = True
    wake_at: float = math.inf
    resolves: dict[int, ResolveResult] = field(default_factory=dict)
    bootstraps_done: set[int] = field(default_factory=set)


class SimNetwork:
    def __init__(
        self,
        seed: int = 1,
        loss: float = 0.0,
        latency: Callable[[random.Random], float] | None = None,
        config: Callable[[bytes], ProtocolConfig] | None = None,
    ) -> None:
        self.rng = random.Random(seed)
        self.loss = loss
        self.latency = latency or lognormal_latency()
        self._config = config or (lambda nid: ProtocolConfig(node_id=nid, registry_port=5000))
        self.nodes: dict[Addr, SimNode] = {}
        self.now = 0.0
        self._events: list[tuple[float, int, int, object]] = []  # (when, seq, kind, payload)
        self._seq = itertools.count()
        self.delivered = 0
        self.dropped = 0

    # -- building ----------------------------------------------------------------------------------

    def add_node(self, node_id: bytes | None = None) -> SimNode:
        n = len(self.nodes) + 1
        addr = (f"10.{77 + (n >> 16)}.{(n >> 8) & 255}.{n & 255}", DHT_PORT)
        node_id = node_id or random_node_id(self.rng)
        protocol = DhtProtocol(self._config(node_id), random.Random(self.rng.getrandbits(64)))
        node = self.nodes[addr] = SimNode(addr, protocol)
        return node

    def grow(self, count: int, seeds_per_node: int = 3, join_gap: float = 0.05) -> list[SimNode]:
        """Add `count` nodes one after another, each joining through a few random earlier nodes."""
        added = []
        for _ in range(count):
            earlier = [n.addr for n in self.nodes.values() if n.alive]
            node = self.add_node()
            seeds = self.rng.sample(earlier, min(seeds_per_node, len(earlier)))
            self.bootstrap(node, seeds)
            self.run_for(join_gap)
            added.append(node)
        return added

    def kill(self, node: SimNode) -> None:
        """The node vanishes without notice: it neither sends nor answers from now on."""
        node.alive = False

    def alive(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.alive]

    # -- driving the cores -------------------------------------------------------------------------

    def bootstrap(self, node: SimNode, seeds: Iterable[Addr]) -> int:
        job_id, effects = node.protocol.bootstrap(seeds, self.now)
        self.apply(node, effects)
        return job_id

    def advertise(
        self, node: SimNode, keys: Iterable[str], state: RecordState = RecordState.COMPLETE
    ) -> None:
        self.apply(node, node.protocol.advertise(keys, self.now, state))

    def withdraw(self, node: SimNode, keys: Iterable[str]) -> None:
        self.apply(node, node.protocol.withdraw(keys, self.now))

    def resolve(self, node: SimNode, key: str) -> ResolveResult:
        lookup_id, effects = node.protocol.start_resolve(key, self.now)
        result = node.resolves[lookup_id] = ResolveResult(key, self.now)
        self.apply(node, effects)
        return result

    def apply(self, node: SimNode, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Send):
                if not node.alive or self.rng.random() < self.loss:
                    self.dropped += 1
                    continue
                when = self.now + self.latency(self.rng)
                self._push(when, 0, (node.addr, effect.addr, effect.data))
            elif isinstance(effect, ProvidersFound):
                result = node.resolves.get(effect.lookup_id)
                if result is not None:
                    if result.first_provider_at is None:
                        result.first_provider_at = self.now
                    result.providers.extend(effect.providers)
            elif isinstance(effect, LookupDone):
                result = node.resolves.get(effect.lookup_id)
                if result is not None:
                    result.stats = effect.stats
                    result.done_at = self.now
            elif isinstance(effect, BootstrapDone):
                node.bootstraps_done.add(effect.job_id)
        deadline = node.protocol.next_deadline()
        if deadline is not None and deadline < node.wake_at:
            node.wake_at = deadline
            self._push(deadline, 1, node.addr)

    def _push(self, when: float, kind: int, payload: object) -> None:
        heapq.heappush(self._events, (when, next(self._seq), kind, payload))

    def _step(self) -> None:
        when, _, kind, payload = heapq.heappop(self._events)
        self.now = max(self.now, when)
        if kind == 0:
            src, dst, data = cast(tuple[Addr, Addr, bytes], payload)
            node = self.nodes.get(dst)
            if node is None or not node.alive:
                self.dropped += 1
                return
            self.delivered += 1
            self.apply(node, node.protocol.handle_datagram(data, src, self.now))
        else:
            node = self.nodes[cast(Addr, payload)]
            if node.wake_at != when:
                return  # superseded by an earlier wake-up
            node.wake_at = math.inf
            if node.alive:
                self.apply(node, node.protocol.handle_timeouts(self.now))

    def next_event(self) -> float | None:
        return self._events[0][0] if self._events else None

    def run_until(self, until: float, stop: Callable[[], bool] | None = None) -> None:
        """Process events up to time `until` (or until `stop()` is true), as fast as possible."""
        while self._events and self._events[0][0] <= until:
            self._step()
            if stop is not None and stop():
                return
        self.now = max(self.now, until)

    def run_for(self, seconds: float, stop: Callable[[], bool] | None = None) -> None:
        self.run_until(self.now + seconds, stop)

    async def run_trio(self, until: float, stop: Callable[[], bool] | None = None) -> None:
        """Like `run_until`, on Trio's clock: sleeps until each event is due (instant under
        MockClock with autojump). Simulated time and `trio.current_time()` advance together."""
        offset = trio.current_time() - self.now
        while self._events and self._events[0][0] <= until:
            await trio.sleep_until(self._events[0][0] + offset)
            self._step()
            if stop is not None and stop():
                return
        await trio.sleep_until(until + offset)
        self.now = max(self.now, until)
