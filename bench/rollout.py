"""Rollout simulation at scale: N nodes pull one new image at once; upstream copies, pull times.

Why: a burst of thousands of nodes cannot run on one machine, but the decisions that shape it can.
Every node's mirror request runs the agent's own sans-IO cores
(`registry.burst.claim.ProviderWait` for claim/wait/provider choice,
`registry.burst.provider_choice.UploadSlots` for the upload bound) over a flow-level network model:
- each node has an up and a down link (bytes/s); every transfer on a link gets an equal share,
  and a stream from an inflight provider never gets ahead of the bytes that provider has;
- the upstream registry is one shared link, split equally over the streams it serves;
- control messages (DHT lookups and stores, HTTP round trips) cost a few per-hop delays; a lookup
  returns a random sample of the provider records visible when it reaches the storing nodes;
- an ingest is advertised inflight once its first bytes landed (watcher delay + a store), and
  complete once done; a claim record is stored when the core says PublishClaim;
- a fraction of nodes is slow (links at `--slow-factor`), a fraction dies at a random moment of the
  rollout (its streams stop; its children notice after `stall_timeout` and fail over; its records
  stay in the DHT, so fetches from it fail after the response timeout);
- a busy provider (upload bound reached) answers at once and the requester moves on.
Time advances in fixed steps of `--dt` for the bytes; control events run at their exact times
between steps.  Deterministic for a seed.

  python -m bench.rollout --nodes 1000 --json

Prints one JSON object.  Kraken's published figure for comparison: 3 GB image, 2600 hosts, p50 10 s,
p99 18 s, with a central tracker and origin cluster.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from registry.burst.claim import (
    ClaimSettings,
    Fetch,
    Miss,
    ProviderWait,
    PublishClaim,
    Resolve,
    Wait,
    WithdrawClaim,
)
from registry.burst.provider_choice import RecordState, Sighting, UploadSlots

GBIT = 1e9 / 8  # bytes per second


@dataclass(frozen=True, slots=True)
class Params:
    nodes: int = 1000
    image_gb: float = 3.0
    layers: int = 2
    node_gbit: float = 10.0
    upstream_gbit: float = 1.0
    hop_ms: float = 0.5  # one network hop (a DHT round trip is two, a lookup about 3 round trips)
    upstream_rtt_ms: float = 50.0  # containerd's 404 -> upstream -> first byte
    arrival_spread_s: float = 2.0  # nodes start their pull uniformly within this window
    slow_fraction: float = 0.05
    slow_factor: float = 0.1  # a slow node's links run at this fraction of node_gbit
    dead_fraction: float = 0.01
    upload_limit: int = 8  # concurrent uploads per node (the agent's --mirror-max-uploads)
    watcher_s: float = 0.1  # a new ingest is noticed within this
    stall_timeout_s: float = 5.0
    response_timeout_s: float = 2.0
    retry_after_s: float = 1.0
    lookup_sample: int = 40  # provider records one lookup returns at most
    lag_mb: float = 2.0  # an upload this far behind its provider's ingest: the provider lags
    dt: float = 0.05
    seed: int = 1


@dataclass(eq=False, slots=True)
class Node:
    index: int
    node_id: bytes
    up: float
    down: float
    arrive: float
    dies_at: float
    slots: UploadSlots
    uploads: list[Transfer] = field(default_factory=list)  # the transfers this node feeds
    downloads: int = 0
    alive: bool = True
    slow: bool = False


@dataclass(eq=False, slots=True)
class Transfer:
    """One node's pull of one layer, and the one stream currently feeding it."""

    node: Node
    layer: int
    size: float
    wait: ProviderWait | None = None
    phase: str = "idle"  # deciding | connecting | streaming | done | dead
    received: float = 0.0
    parent: Transfer | None = None  # None while streaming = from upstream
    depth: int = 0
    first_byte_at: float = math.inf
    last_progress: float = 0.0
    done_at: float = math.inf
    advertised: RecordState | None = None
    token: int = 0  # stale timer events carry an older token
    peer_bytes: float = 0.0
    upstream_bytes: float = 0.0


@dataclass(slots=True)
class Records:
    """Provider records of one layer as the DHT shows them: the newest state visible per node."""

    state: dict[bytes, RecordState] = field(default_factory=dict)
    listed: list[bytes] = field(default_factory=list)  # nodes with a visible record (for sampling)

    def set(self, node_id: bytes, state: RecordState | None) -> None:
        if state is None:
            if self.state.pop(node_id, None) is not None:
                self.listed.remove(node_id)
            return
        if node_id not in self.state:
            self.listed.append(node_id)
        self.state[node_id] = state


class Simulation:
    def __init__(self, p: Params) -> None:
        self.p = p
        self.rng = random.Random(p.seed)
        self.now = 0.0
        self.events: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = itertools.count()
        self.settings = ClaimSettings()
        self.records = [Records() for _ in range(p.layers)]
        self.by_id: dict[bytes, Node] = {}
        self.transfers: dict[tuple[bytes, int], Transfer] = {}
        self.streams: list[Transfer] = []
        self.advertised_inflight: set[Transfer] = set()
        self.upstream_streams = 0
        self.lookups = 0
        self.busy_answers = 0
        self.claims = 0
        self.claimants = 0
        self.failovers = 0
        self.miss_reasons: dict[str, int] = {}
        layer_size = p.image_gb * 1e9 / p.layers
        for i in range(p.nodes):
            node_id = self.rng.randbytes(32)
            slow = self.rng.random() < p.slow_fraction
            link = p.node_gbit * GBIT * (p.slow_factor if slow else 1.0)
            dies = self.rng.random() < p.dead_fraction
            arrive = self.rng.uniform(0, p.arrival_spread_s)
            one_copy = p.image_gb * 1e9 / (p.upstream_gbit * GBIT)
            dies_at = arrive + self.rng.uniform(0, one_copy) if dies else math.inf
            node = Node(i, node_id, link, link, arrive, dies_at, UploadSlots(p.upload_limit))
            node.slow = slow
            self.by_id[node_id] = node
            for layer in range(p.layers):
                self.transfers[(node_id, layer)] = Transfer(node, layer, layer_size)
            self.at(arrive, self._arrive(node))
            if dies:
                self.at(dies_at, self._die(node))

    # -- event plumbing ----------------------------------------------------------------------------

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self.events, (max(when, self.now), next(self.seq), action))

    def hop(self, n: float = 1.0) -> float:
        return n * self.p.hop_ms / 1000 * self.rng.uniform(0.8, 1.6)

    def publish(self, t: Transfer, state: RecordState | None) -> None:
        """Store (or withdraw) `t.node`'s record for its layer; visible after a store's hops."""
        node_id, records = t.node.node_id, self.records[t.layer]
        self.at(self.now + self.hop(8), lambda: records.set(node_id, state))

    # -- one node's pull ---------------------------------------------------------------------------

    def _arrive(self, node: Node) -> Callable[[], None]:
        def go() -> None:
            for layer in range(self.p.layers):
                t = self.transfers[(node.node_id, layer)]
                t.wait = ProviderWait(node.node_id, f"layer{layer}", self.now, self.settings)
                t.phase = "deciding"
                self._resolve(t)

        return go

    def _resolve(self, t: Transfer) -> None:
        """A lookup: records as seen half-way through it, delivered when it ends."""
        self.lookups += 1
        seen_at, ends_at = self.now + self.hop(3), self.now + self.hop(6)
        token = t.token

        def look() -> None:
            records = self.records[t.layer]
            sample = records.listed
            if len(sample) > self.p.lookup_sample:
                sample = self.rng.sample(sample, self.p.lookup_sample)
            found = [
                Sighting(n, (str(self.by_id[n].index), 0), records.state[n])
                for n in sample
                if n in records.state
            ]
            self.at(ends_at, lambda: deliver(found))

        def deliver(found: list[Sighting]) -> None:
            if t.phase != "deciding" or t.wait is None:
                return
            for s in found:
                t.wait.seen(s)
            t.wait.round_ended(self.now)
            if t.token == token:
                self._step(t)

        self.at(seen_at, look)

    def _step(self, t: Transfer) -> None:
        assert t.wait is not None
        t.token += 1
        while t.phase == "deciding" and t.node.alive:
            step = t.wait.step(self.now)
            if isinstance(step, PublishClaim):
                self.claims += 1
                self.publish(t, RecordState.CLAIM)
            elif isinstance(step, WithdrawClaim):
                self.publish(t, None)
            elif isinstance(step, Resolve):
                self._resolve(t)
                return
            elif isinstance(step, Wait):
                self.at(step.until, self._wake(t, t.token))
                return
            elif isinstance(step, Fetch):
                if step.withdraw_claim:
                    self.publish(t, None)
                self._connect(t, self.by_id_index(step.sighting))
                return
            elif isinstance(step, Miss):
                reason = step.reason.split(" layer")[0].split(" of ")[0]
                self.miss_reasons[reason] = self.miss_reasons.get(reason, 0) + 1
                if step.claimant:
                    self.claimants += 1
                self._upstream(t)
                return

    def _wake(self, t: Transfer, token: int) -> Callable[[], None]:
        return lambda: self._step(t) if t.token == token else None

    def by_id_index(self, s: Sighting) -> Node:
        return self.by_id[s.node_id]

    def _connect(self, t: Transfer, peer: Node) -> None:
        t.phase = "connecting"
        source = self.transfers[(peer.node_id, t.layer)]
        assert t.wait is not None
        wait = t.wait

        def answer() -> None:
            if not t.node.alive:
                return
            if not peer.alive:
                wait.exclude((str(peer.index), 0), self.now)
                self.failovers += 1
            elif not peer.slots.try_acquire(f"layer{t.layer}", lagging=self._lagging(peer)):
                self.busy_answers += 1
                wait.busy((str(peer.index), 0), self.now + self.p.retry_after_s, self.now)
            else:
                self._start_stream(t, source)
                return
            t.phase = "deciding"
            self._step(t)

        delay = self.p.response_timeout_s if not peer.alive else self.hop(4)
        self.at(self.now + delay, answer)

    def _lagging(self, node: Node) -> bool:
        """Is one of `node`'s uploads of a blob it is still receiving behind its ingest?"""
        limit = self.p.lag_mb * 1e6
        return any(
            c.parent is not None
            and c.parent.node is node
            and c.parent.phase == "streaming"
            and c.parent.received - c.received > limit
            for c in node.uploads
        )

    def _upstream(self, t: Transfer) -> None:
        t.phase = "connecting"

        def start() -> None:
            if t.node.alive:
                self._start_stream(t, None)

        self.at(self.now + self.p.upstream_rtt_ms / 1000, start)

    def _start_stream(self, t: Transfer, source: Transfer | None) -> None:
        t.phase = "streaming"
        t.parent = source
        t.depth = 0 if source is None else source.depth + 1
        t.last_progress = self.now
        t.node.downloads += 1
        if source is None:
            self.upstream_streams += 1
        else:
            source.node.uploads.append(t)
        self.streams.append(t)

    def _end_stream(self, t: Transfer) -> None:
        """Stop `t`'s stream (the caller sets its next phase; `_flow` drops it from the list)."""
        t.node.downloads -= 1
        if t.parent is None:
            self.upstream_streams -= 1
        else:
            t.parent.node.slots.release(f"layer{t.layer}")
            t.parent.node.uploads.remove(t)
        t.parent = None

    def _die(self, node: Node) -> Callable[[], None]:
        def go() -> None:
            node.alive = False
            for layer in range(self.p.layers):
                t = self.transfers[(node.node_id, layer)]
                if t.phase == "streaming":
                    self._end_stream(t)
                t.phase = "dead"
                t.token += 1

        return go

    # -- bytes -------------------------------------------------------------------------------------

    def _flow(self, dt: float) -> None:
        """Move bytes for one step; parents before children so a child never passes its parent."""
        up_share = self.p.upstream_gbit * GBIT / max(1, self.upstream_streams)
        stall = self.p.stall_timeout_s
        self.streams = [t for t in self.streams if t.phase == "streaming"]
        self.streams.sort(key=lambda s: s.depth)
        for t in self.streams:
            if t.phase != "streaming":
                continue
            node, parent = t.node, t.parent
            rate = node.down / max(1, node.downloads)
            if parent is None:
                rate = min(rate, up_share)
                gained = rate * dt
            else:
                pnode = parent.node
                if not pnode.alive:
                    gained = 0.0
                else:
                    rate = min(rate, pnode.up / max(1, pnode.slots.active))
                    gained = min(rate * dt, parent.received - t.received)
            gained = max(0.0, min(gained, t.size - t.received))
            if gained > 0:
                t.received += gained
                t.last_progress = self.now
                if parent is None:
                    t.upstream_bytes += gained
                else:
                    t.peer_bytes += gained
                if t.advertised is None:
                    t.advertised = RecordState.INFLIGHT
                    self.advertised_inflight.add(t)
                    self.at(self.now + self.rng.uniform(0, self.p.watcher_s), self._advertise(t))
            if t.received >= t.size:
                self._end_stream(t)
                t.phase = "done"
                t.done_at = self.now
                t.advertised = RecordState.COMPLETE
                self.advertised_inflight.discard(t)
                self.publish(t, RecordState.COMPLETE)
            elif self.now - t.last_progress >= stall:
                assert t.wait is not None and parent is not None
                self._end_stream(t)
                self.failovers += 1
                t.wait.exclude((str(parent.node.index), 0), self.now)
                t.phase = "deciding"
                self._step(t)

        # an ingest that stopped growing is no source: its record goes until it grows again
        for t in [t for t in self.advertised_inflight if self.now - t.last_progress >= stall]:
            self.advertised_inflight.discard(t)
            t.advertised = None
            if t.node.alive:
                self.publish(t, None)

    def _advertise(self, t: Transfer) -> Callable[[], None]:
        def go() -> None:
            if t.node.alive and t.advertised is RecordState.INFLIGHT:
                self.publish(t, RecordState.INFLIGHT)

        return go

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        dt = self.p.dt
        step_end = 0.0
        horizon = 3600.0
        while step_end < horizon:
            step_end += dt
            while self.events and self.events[0][0] <= step_end:
                when, _, action = heapq.heappop(self.events)
                self.now = when
                action()
            self.now = step_end
            self._flow(dt)
            if not self.events and not self.streams:
                break
        return self._report(time.monotonic() - started)

    def _report(self, wall: float) -> dict[str, Any]:
        p = self.p
        pulls: list[float] = []
        for node in self.by_id.values():
            if not node.alive or math.isinf(node.dies_at) is False:
                continue
            ends = [self.transfers[(node.node_id, layer)].done_at for layer in range(p.layers)]
            pulls.append(max(ends) - node.arrive)
        upstream = sum(t.upstream_bytes for t in self.transfers.values())
        image = p.image_gb * 1e9
        one_copy = image / (p.upstream_gbit * GBIT)
        pulls.sort()
        p99 = pulls[max(0, math.ceil(0.99 * len(pulls)) - 1)] if pulls else math.nan
        return {
            "nodes": p.nodes,
            "params": {k: getattr(p, k) for k in p.__dataclass_fields__},
            "pulled": len(pulls),
            "unfinished": sum(1 for x in pulls if math.isinf(x)),
            "upstream_copies": round(upstream / image, 3),
            "one_upstream_copy_s": round(one_copy, 2),
            "pull_p50_s": round(statistics.median(pulls), 2) if pulls else None,
            "pull_p99_s": round(p99, 2),
            "pull_max_s": round(pulls[-1], 2) if pulls else None,
            "p99_over_one_copy": round(p99 / one_copy, 3),
            "claims_published": self.claims,
            "claimants": self.claimants,
            "misses": self.miss_reasons,
            "busy_answers": self.busy_answers,
            "failovers": self.failovers,
            "lookups": self.lookups,
            "max_depth": max((t.depth for t in self.transfers.values()), default=0),
            "sim_wall_s": round(wall, 1),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.rollout", description=__doc__.splitlines()[0]
    )
    defaults = Params()
    for name in Params.__dataclass_fields__:
        value = getattr(defaults, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--json", action="store_true", help="print JSON only (the default output)")
    args = parser.parse_args(argv)
    p = Params(**{name: getattr(args, name) for name in Params.__dataclass_fields__})
    if p.nodes < 1 or p.layers < 1 or p.dt <= 0 or not 0 <= p.dead_fraction < 1:
        print("bench.rollout: bad arguments", file=sys.stderr)
        return 2
    print(json.dumps(Simulation(p).run()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
