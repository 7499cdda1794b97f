"""`spegla_dht_*` metrics: real DHT nodes on loopback scraped through prometheus-client, the
per-registry attach/detach that lets several in-process agents share the default registry, and
the series on an in-process agent's /metrics."""

from __future__ import annotations

import dataclasses
import functools
import random
import socket
from collections.abc import Callable
from pathlib import Path

import httpx
import trio
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.config import HostPort
from agent.observability.dht_metrics import DhtCollector, combined, export, exported
from agent.runtime.run import Hooks, run_agent
from dht.config import Statistics
from dht.node import Node, NodeConfig
from tests.agent.runtime.test_run import config, memory_backend, mini_app

KEY = "sha256:" + "ab" * 32


def scrape(registry: CollectorRegistry) -> dict[str, float]:
    """Sample name -> value from the text exposition, as Prometheus would read it."""
    text = generate_latest(registry).decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def stats(**values: int) -> Statistics:
    zero = {f.name: 0 for f in dataclasses.fields(Statistics)}
    return Statistics(**{**zero, **values})


def node(seed: int) -> Node:
    rng = random.Random(seed)
    cfg = NodeConfig(
        node_id=rng.randbytes(32), bind_host="127.0.0.1", bind_port=0, registry_port=5000 + seed
    )
    return Node(cfg, rng=rng)


async def wait_for(predicate: Callable[[], bool], what: str) -> None:
    """Wait for something that happens over real sockets (bounded; not a speed assertion)."""
    with trio.move_on_after(10):
        while not predicate():  # noqa: ASYNC110 (a condition over a node's state)
            await trio.sleep(0.01)
        return
    raise AssertionError(f"never happened: {what}")


def test_sums_attached_sources_and_reports_nothing_when_none() -> None:
    assert combined([stats(table_size=2, rpcs_sent=5), stats(table_size=1)]) == stats(
        table_size=3, rpcs_sent=5
    )
    registry = CollectorRegistry()
    collector = DhtCollector()
    registry.register(collector)
    assert scrape(registry) == {}
    collector.attach(lambda: stats(table_size=4, bad_datagrams=7, claims_refused=3))
    samples = scrape(registry)
    assert samples["spegla_dht_routing_table_size"] == 4
    assert samples["spegla_dht_bad_datagrams_total"] == 7
    assert samples["spegla_dht_rpcs_sent_total"] == 0
    assert samples["spegla_dht_claims_refused_total"] == 3  # the trust counters too
    assert samples["spegla_dht_moves_refused_total"] == 0


def test_export_tolerates_several_nodes_and_unregisters_with_the_last() -> None:
    registry = CollectorRegistry()
    first = export(lambda: stats(table_size=1, rate_limited=2), registry)
    with exported(lambda: stats(table_size=2, rate_limited=3), registry):
        samples = scrape(registry)
        assert samples["spegla_dht_routing_table_size"] == 3
        assert samples["spegla_dht_rate_limited_total"] == 5
    assert scrape(registry)["spegla_dht_routing_table_size"] == 1
    first()
    first()  # a second call is harmless
    assert scrape(registry) == {}
    # Registered again from scratch: nothing was left behind under these names.
    with exported(lambda: stats(lookups_active=1), registry):
        assert scrape(registry)["spegla_dht_lookups_active"] == 1


async def test_real_nodes_move_table_size_and_counters(nursery: trio.Nursery) -> None:
    a, b = node(1), node(2)
    for n in (a, b):
        await nursery.start(n.serve)
    registry = CollectorRegistry()
    registry.register(DhtCollector(a.statistics))
    before = scrape(registry)
    assert before["spegla_dht_routing_table_size"] == 0
    assert before["spegla_dht_rpcs_received_total"] == 0

    assert a.bound is not None
    await b.bootstrap([a.bound])
    await wait_for(lambda: a.statistics().table_size >= 1, "a learns b")
    await b.router.advertise([KEY])
    await wait_for(lambda: a.statistics().records_held >= 1, "a stores b's record")
    joined = scrape(registry)
    assert joined["spegla_dht_routing_table_size"] == 1
    assert joined["spegla_dht_provider_records"] == 1
    assert joined["spegla_dht_rpcs_received_total"] > 0
    assert joined["spegla_dht_datagrams_received_total"] > 0
    assert joined["spegla_dht_datagrams_sent_total"] > 0

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"not a dht message", a.bound)
    await wait_for(lambda: a.statistics().bad_datagrams == 1, "a drops the garbage")
    assert scrape(registry)["spegla_dht_bad_datagrams_total"] == 1


async def test_agent_metrics_endpoint_serves_the_dht_series(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    cfg_a = config(str(tmp_path / "a"))
    cfg_b = config(str(tmp_path / "b"), peers=(HostPort("127.0.0.1", cfg_a.router_addr.port),))
    stop = trio.Event()
    handles = []
    for cfg in (cfg_a, cfg_b):
        hooks = Hooks(backend=memory_backend([KEY] if cfg is cfg_a else [], []), app=mini_app)
        handles.append(
            await nursery.start(
                functools.partial(run_agent, cfg, stop, hooks, handle_signals=False)
            )
        )
    async with httpx.AsyncClient() as http:
        with trio.fail_after(15):
            for handle in handles:
                url = f"http://127.0.0.1:{handle.registry_port}/readyz"
                while (await http.get(url)).status_code != 200:  # noqa: ASYNC110
                    await trio.sleep(0.05)
        text = (await http.get(f"http://127.0.0.1:{handles[1].metrics_port}/metrics")).text
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    # Both agents run in this process, so the default registry reports their sum.
    assert samples["spegla_dht_routing_table_size"] >= 2
    assert samples["spegla_dht_advertised_keys"] == 1
    assert samples["spegla_dht_rpcs_sent_total"] > 0
    stop.set()
    await wait_for(lambda: "spegla_dht_" not in generate_latest(REGISTRY).decode(), "unexported")
