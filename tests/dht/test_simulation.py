"""The simulated network at scale (1000 nodes, a tenth of them dying without notice), and the same
simulation driven on Trio's mock clock."""

from __future__ import annotations

import random
import statistics

import trio
import trio.testing

from dht.protocol import ProtocolConfig
from dht.simulation import SimNetwork


def test_a_thousand_nodes_find_providers_while_a_tenth_vanish() -> None:
    # join_refresh=0 keeps the joins cheap enough for CI; the bench runs the default
    net = SimNetwork(
        seed=11,
        config=lambda nid: ProtocolConfig(node_id=nid, registry_port=5000, join_refresh=0),
    )
    nodes = net.grow(1000, join_gap=0.02)
    net.run_for(2.0)
    rng = random.Random(3)
    dead = set(rng.sample(range(1000), 100))
    survivors = [n for i, n in enumerate(nodes) if i not in dead]
    keys = [(f"sha256:{i:064x}", rng.choice(survivors)) for i in range(40)]
    for key, provider in keys:
        net.advertise(provider, [key])
    net.run_for(10.0)
    for i in dead:
        net.kill(nodes[i])
    results = []
    for key, provider in keys:
        seeker = rng.choice([n for n in survivors if n is not provider])
        results.append((provider, net.resolve(seeker, key)))
    net.run_for(5.0)
    found = [r for p, r in results if p.protocol.node_id in {x.node_id for x in r.providers}]
    assert len(found) == len(results)
    assert all(r.stats is not None and r.stats.converged for _, r in results)
    rounds = [r.stats.rounds_to_first_provider for r in found if r.stats]
    rpcs = [r.stats.rpcs_to_first_provider for r in found if r.stats]
    assert statistics.median(x or 0 for x in rounds) <= 3
    assert statistics.median(x or 0 for x in rpcs) <= 12


async def test_the_simulation_runs_on_the_trio_mock_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = SimNetwork(seed=2, loss=0.05)
    nodes = [net.add_node() for _ in range(30)]
    start = trio.current_time()
    for i, node in enumerate(nodes):
        net.bootstrap(node, [nodes[0].addr] if i else [])
        await net.run_trio(net.now + 0.1)
    net.advertise(nodes[4], ["docker.io/library/nginx:1.25"])
    await net.run_trio(net.now + 2.0)
    result = net.resolve(nodes[20], "docker.io/library/nginx:1.25")
    await net.run_trio(net.now + 700.0)  # past the ttl: records live on only through refreshes
    assert [p.node_id for p in result.providers] == [nodes[4].protocol.node_id]
    late = net.resolve(nodes[25], "docker.io/library/nginx:1.25")
    await net.run_trio(net.now + 1.0)
    assert [p.node_id for p in late.providers] == [nodes[4].protocol.node_id]
    # simulated time and Trio's clock moved together
    assert abs((trio.current_time() - start) - net.now) < 1e-6
