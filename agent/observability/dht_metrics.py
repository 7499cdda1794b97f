"""The DHT node's counters as Prometheus metrics (`spegla_dht_*`), read when /metrics is scraped.

Why a custom collector rather than Gauge/Counter objects: the sans-IO protocol already keeps every
figure in one `Statistics` snapshot. Reading it at scrape time costs nothing between scrapes, needs
no polling task and no hooks in the core, and is never stale. The table size is the "peers" signal:
a node whose routing table is empty shares nothing and pulls everything from upstream.

Why one collector per registry that nodes attach to: prometheus-client's default registry is
process-wide and refuses two collectors exposing the same names, while in-process tests run several
agents at once. `export(node.statistics)` attaches a node until its agent stops; the
collector is registered while at least one node is attached and reports the sum over them, which in
production (one agent per process) is exactly that node's figures.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dht.config import Statistics

StatisticsSource = Callable[[], Statistics]

_ZERO = Statistics(**{f.name: 0 for f in dataclasses.fields(Statistics)})


def families(s: Statistics) -> list[Metric]:
    """The metric families for one snapshot; every name is spelled out here (the manifests test
    finds declared names by reading the source)."""
    return [
        GaugeMetricFamily(
            "spegla_dht_routing_table_size",
            "Contacts in the DHT routing table: the peers this node knows (0 = isolated).",
            value=s.table_size,
        ),
        GaugeMetricFamily(
            "spegla_dht_provider_records",
            "Provider records this node holds for the cluster.",
            value=s.records_held,
        ),
        GaugeMetricFamily(
            "spegla_dht_advertised_keys",
            "Keys this node advertises in the DHT and re-announces before they expire.",
            value=s.keys_advertised,
        ),
        GaugeMetricFamily(
            "spegla_dht_announces_queued",
            "Announces waiting for their turn under the announce rate limit.",
            value=s.announces_queued,
        ),
        GaugeMetricFamily(
            "spegla_dht_lookups_active",
            "DHT lookups (resolves, announces, bucket refreshes) running now.",
            value=s.lookups_active,
        ),
        GaugeMetricFamily(
            "spegla_dht_rpcs_in_flight",
            "DHT requests sent and still waiting for their reply.",
            value=s.rpcs_in_flight,
        ),
        CounterMetricFamily("spegla_dht_rpcs_sent_total", "DHT requests sent.", value=s.rpcs_sent),
        CounterMetricFamily(
            "spegla_dht_rpcs_received_total",
            "DHT requests received from other nodes.",
            value=s.rpcs_received,
        ),
        CounterMetricFamily(
            "spegla_dht_rpcs_timed_out_total",
            "DHT requests that got no reply in time.",
            value=s.rpcs_timed_out,
        ),
        CounterMetricFamily(
            "spegla_dht_bad_datagrams_total",
            "Datagrams dropped as malformed or failing the pre-shared-key check.",
            value=s.bad_datagrams,
        ),
        CounterMetricFamily(
            "spegla_dht_rate_limited_total",
            "Datagrams dropped by the per-source-address rate limit.",
            value=s.rate_limited,
        ),
        CounterMetricFamily(
            "spegla_dht_tokens_refused_total",
            "Provider announcements refused for a missing or stale token.",
            value=s.tokens_refused,
        ),
        CounterMetricFamily(
            "spegla_dht_unexpected_replies_total",
            "Replies matching no request in flight (late, spoofed or from the wrong node).",
            value=s.unexpected_replies,
        ),
        CounterMetricFamily(
            "spegla_dht_datagrams_sent_total", "UDP datagrams sent.", value=s.datagrams_sent
        ),
        CounterMetricFamily(
            "spegla_dht_datagrams_received_total",
            "UDP datagrams received, before any check.",
            value=s.datagrams_received,
        ),
        CounterMetricFamily(
            "spegla_dht_replies_trimmed_total",
            "Replies to a source that has not proven its address, sized to its request.",
            value=s.replies_trimmed,
        ),
        CounterMetricFamily(
            "spegla_dht_records_refused_quota_total",
            "Provider records refused because their source IP reached its quota.",
            value=s.records_refused_quota,
        ),
        CounterMetricFamily(
            "spegla_dht_claims_refused_total",
            "In-flight or claim records refused from a sender that has not proven its id.",
            value=s.claims_refused,
        ),
        CounterMetricFamily(
            "spegla_dht_moves_refused_total",
            "Contact address changes refused: the old address still answered, or the new did not.",
            value=s.moves_refused,
        ),
    ]


def combined(snapshots: Iterable[Statistics]) -> Statistics:
    """Field-by-field sum of several nodes' statistics."""
    items = list(snapshots)
    return Statistics(
        **{f.name: sum(getattr(s, f.name) for s in items) for f in dataclasses.fields(Statistics)}
    )


class DhtCollector(Collector):
    """Reports the attached nodes' statistics; nothing at all while none is attached."""

    def __init__(self, *sources: StatisticsSource) -> None:
        self._lock = threading.Lock()  # scrapes may come from another thread than attach/detach
        self._sources: list[StatisticsSource] = list(sources)

    def attach(self, source: StatisticsSource) -> None:
        with self._lock:
            self._sources.append(source)

    def detach(self, source: StatisticsSource) -> int:
        """Forget `source`; returns how many remain attached."""
        with self._lock:
            self._sources.remove(source)
            return len(self._sources)

    def describe(self) -> Iterable[Metric]:
        return families(_ZERO)  # names only; registering must not read a node

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            sources = list(self._sources)
        if not sources:
            return []
        return families(combined(source() for source in sources))


# Prometheus registration, the one process-wide state here (prometheus-client's registries are
# process-wide): each registry -> its one DHT collector, present while a node is attached to it.
_collectors: dict[CollectorRegistry, DhtCollector] = {}
_collectors_lock = threading.Lock()


def export(source: StatisticsSource, registry: CollectorRegistry = REGISTRY) -> Callable[[], None]:
    """Expose `source` (usually `node.statistics`) in `registry`; call the result to stop."""
    with _collectors_lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = DhtCollector()
            registry.register(collector)
            _collectors[registry] = collector
        collector.attach(source)
    done = False

    def unexport() -> None:
        nonlocal done
        with _collectors_lock:
            if done:
                return
            done = True
            if collector.detach(source) == 0:
                registry.unregister(collector)
                del _collectors[registry]

    return unexport


@contextmanager
def exported(source: StatisticsSource, registry: CollectorRegistry = REGISTRY) -> Iterator[None]:
    """`export` for the duration of a block."""
    unexport = export(source, registry)
    try:
        yield
    finally:
        unexport()
