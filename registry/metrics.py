"""Prometheus metrics of the registry, with Spegel's names and labels (spec §7).

Why module-level: prometheus-client registers each metric once per process in its default
registry, which the agent's /metrics endpoint serves; every app instance in a process shares them.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "HTTP_INFLIGHT",
    "HTTP_REQUEST_DURATION",
    "HTTP_RESPONSE_SIZE",
    "MIRROR_LAST_SUCCESS",
    "MIRROR_REQUESTS",
    "PEER_QUARANTINED",
    "RESOLVE_DURATION",
]

MIRROR_REQUESTS = Counter(
    "spegel_mirror_requests_total",
    "Total number of mirror requests.",
    ["registry", "cache"],
)
MIRROR_LAST_SUCCESS = Gauge(
    "spegel_mirror_last_success_timestamp_seconds",
    "The timestamp of the last successful mirror request.",
)
RESOLVE_DURATION = Histogram(
    "spegel_resolve_duration_seconds",
    "The duration for router to resolve a peer.",
    ["router"],
)
HTTP_REQUEST_DURATION = Histogram(
    "http_request_duration_seconds",
    "The latency of the HTTP requests.",
    ["handler", "method", "code"],
)
HTTP_RESPONSE_SIZE = Histogram(
    "http_response_size_bytes",
    "The size of the HTTP responses.",
    ["handler", "method", "code"],
    buckets=[1024 * 5**k for k in range(10)],
)
HTTP_INFLIGHT = Gauge(
    "http_requests_inflight",
    "The number of inflight requests being handled at the same time.",
    ["handler"],
)
# Not in Spegel (it never verifies peer content): peers caught serving bytes of another digest.
PEER_QUARANTINED = Counter(
    "spegel_mirror_peer_quarantined_total",
    "Peers quarantined for a digest after serving content that did not match it.",
    ["registry"],
)
