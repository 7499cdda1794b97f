"""DHT lookup benchmark: the real protocol core on a simulated network, or real Nodes on UDP.

Simulated (default): N nodes join one after another; L keys are each announced by one node; then a
fraction of the nodes vanishes without notice and L lookups (from random live nodes, for keys whose
provider is alive) run to their first provider. Rounds, RPCs and (simulated) latency are per lookup
up to its first provider. `messages_per_node_per_s` is the steady-state datagram rate per node
when every node advertises 400 keys every `refresh` seconds: a sample of nodes announces 400 keys
each, and every request they send counts twice (it and its reply).

`--udp M`: M real `Node`s in this process on 127.0.0.x loopback addresses; wall-clock time from
opening `router.resolve` to the first peer.

    python -m bench.dht --nodes 5000 --lookups 2000 --dead-fraction 0.1 --json
    python -m bench.dht --udp 50 --lookups 500 --json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
from typing import Any

import trio

from dht.ids import random_node_id
from dht.node import Node, NodeConfig
from dht.protocol import ProtocolConfig
from dht.simulation import ResolveResult, SimNetwork

KEYS_PER_NODE = 400
SAMPLE_ADVERTISERS = 5


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def simulate(
    nodes: int, lookups: int, dead_fraction: float, loss: float, seed: int, refresh: float
) -> dict[str, Any]:
    started = time.perf_counter()
    rng = random.Random(seed)
    net = SimNetwork(
        seed=seed,
        config=lambda nid: ProtocolConfig(node_id=nid, registry_port=5000, refresh=refresh),
    )
    members = net.grow(nodes)
    net.run_for(5.0)
    joined = time.perf_counter()

    dead = set(rng.sample(range(nodes), int(nodes * dead_fraction)))
    survivors = [n for i, n in enumerate(members) if i not in dead]
    # steady state: a few nodes each announce KEYS_PER_NODE keys, as every node does once per
    # `refresh`; each request they send costs one datagram out and (by symmetry) one reply
    sample = rng.sample(survivors, min(SAMPLE_ADVERTISERS, len(survivors)))
    sent_before = sum(n.protocol.statistics().rpcs_sent for n in sample)
    for i, node in enumerate(sample):
        own = [f"sha256:{i:08x}{rng.getrandbits(224):056x}" for _ in range(KEYS_PER_NODE)]
        net.advertise(node, own)
    for _ in range(120):
        net.run_for(5.0)
        if not any(n.protocol.statistics().lookups_active for n in sample):
            break
    requests = sum(n.protocol.statistics().rpcs_sent for n in sample) - sent_before
    per_node_cycle = 2 * requests / len(sample)
    per_announce = per_node_cycle / KEYS_PER_NODE

    keys = [f"sha256:{rng.getrandbits(256):064x}" for _ in range(lookups)]
    providers = [rng.choice(survivors) for _ in keys]
    for key, provider in zip(keys, providers, strict=True):
        net.advertise(provider, [key])
    net.run_for(60.0)

    for i in dead:
        net.kill(members[i])
    net.loss = loss
    results: list[ResolveResult] = []
    batch = 50
    for start in range(0, lookups, batch):
        for key, provider in list(zip(keys, providers, strict=True))[start : start + batch]:
            seeker = rng.choice(survivors)
            while seeker is provider:
                seeker = rng.choice(survivors)
            results.append(net.resolve(seeker, key))
        net.run_for(2.0)
    ok = [r for r in results if r.providers]
    rounds = [float(r.stats.rounds_to_first_provider or 0) for r in ok if r.stats]
    rpcs = [float(r.stats.rpcs_to_first_provider or 0) for r in ok if r.stats]
    latency = [(r.first_provider_at - r.started) * 1000 for r in ok if r.first_provider_at]
    miss_rpcs = [float(r.stats.rpcs) for r in results if r.stats]
    tables = [len(n.protocol.table) for n in survivors]
    return {
        "mode": "simulated",
        "nodes": nodes,
        "lookups": len(results),
        "dead_fraction": dead_fraction,
        "loss": loss,
        "success_rate": round(len(ok) / max(1, len(results)), 5),
        "rounds_p50": percentile(rounds, 0.5),
        "rounds_max": max(rounds, default=float("nan")),
        "rpcs_p50": percentile(rpcs, 0.5),
        "rpcs_p99": percentile(rpcs, 0.99),
        "rpcs_to_converge_p50": percentile(miss_rpcs, 0.5),
        "sim_latency_ms_p50": round(percentile(latency, 0.5), 3),
        "sim_latency_ms_p99": round(percentile(latency, 0.99), 3),
        "table_size_p50": percentile([float(t) for t in tables], 0.5),
        "datagrams_per_announce": round(per_announce, 1),
        "messages_per_node_per_s": round(per_node_cycle / refresh, 2),
        "messages_method": f"2 x requests sent by {len(sample)} nodes announcing "
        f"{KEYS_PER_NODE} keys each, per node, / refresh {refresh:g}s",
        "join_wall_s": round(joined - started, 2),
        "wall_s": round(time.perf_counter() - started, 2),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


async def udp(count: int, lookups: int, seed: int) -> dict[str, Any]:
    started = time.perf_counter()
    rng = random.Random(seed)
    nodes: list[Node] = []
    result: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        for i in range(count):
            host = f"127.0.{(i + 2) >> 8}.{(i + 2) & 255}"
            cfg = NodeConfig(node_id=random_node_id(rng), bind_host=host, bind_port=0)
            node = Node(cfg, rng=random.Random(rng.getrandbits(64)))
            await nursery.start(node.serve)
            nodes.append(node)
        for i, node in enumerate(nodes[1:], start=1):
            seeds = [n.bound for n in rng.sample(nodes[:i], min(3, i)) if n.bound]
            await node.bootstrap(seeds)
        keys = [f"sha256:{rng.getrandbits(256):064x}" for _ in range(lookups)]
        providers = [rng.choice(nodes) for _ in keys]
        for key, provider in zip(keys, providers, strict=True):
            await provider.router.advertise([key])
        for _ in range(1200):  # announcing settles in well under a minute
            if not any(
                n.statistics().lookups_active or n.statistics().announces_queued for n in nodes
            ):
                break
            await trio.sleep(0.05)
        await trio.sleep(0.2)
        # 50 nodes share this one heap; in production each has its own, small one. Keep the
        # setup's objects out of the collector's way so a gen-2 pass doesn't land in a lookup.
        gc.collect()
        gc.freeze()
        latencies: list[float] = []
        found = 0
        for key, provider in zip(keys, providers, strict=True):
            seeker = rng.choice([n for n in nodes if n is not provider])
            t0 = time.perf_counter()
            with trio.move_on_after(1.0):
                async with seeker.router.resolve(key) as peers:
                    async for _ in peers:
                        latencies.append((time.perf_counter() - t0) * 1000)
                        found += 1
                        break
        stats = [n.statistics() for n in nodes]
        result = {
            "mode": "udp",
            "nodes": count,
            "lookups": lookups,
            "success_rate": round(found / max(1, lookups), 5),
            "latency_ms_p50": round(percentile(latencies, 0.5), 3),
            "latency_ms_p99": round(percentile(latencies, 0.99), 3),
            "latency_ms_max": round(max(latencies, default=float("nan")), 3),
            "table_size_p50": percentile([float(s.table_size) for s in stats], 0.5),
            "rpcs_timed_out": sum(s.rpcs_timed_out for s in stats),
            "wall_s": round(time.perf_counter() - started, 2),
            "load_avg_1m": round(os.getloadavg()[0], 2),  # other work sharing the CPUs
        }
        nursery.cancel_scope.cancel()
    return result


def main(argv: list[str] | None = None) -> int:
    summary = (__doc__ or "").splitlines()[0]
    parser = argparse.ArgumentParser(prog="python -m bench.dht", description=summary)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--lookups", type=int, default=500)
    parser.add_argument("--dead-fraction", type=float, default=0.0)
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--refresh", type=float, default=540.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--udp", type=int, metavar="M", help="run M real Nodes on loopback UDP")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.udp:
        result = trio.run(udp, args.udp, args.lookups, args.seed)
    else:
        result = simulate(
            args.nodes, args.lookups, args.dead_fraction, args.loss, args.seed, args.refresh
        )
    if args.json:
        print(json.dumps(result))
    else:
        for name, value in result.items():
            print(f"{name:28} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
