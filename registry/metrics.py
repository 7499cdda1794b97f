"""Prometheus metrics of the registry, with Spegel's names and labels (spec §7).

Why module-level: prometheus-client registers each metric once per process in its default
registry, which the agent's /metrics endpoint serves; every app instance in a process shares them.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "CLAIM_OUTCOMES",
    "CLAIM_WAIT",
    "HTTP_INFLIGHT",
    "HTTP_REQUEST_DURATION",
    "HTTP_RESPONSE_SIZE",
    "MIRROR_LAST_SUCCESS",
    "MIRROR_REQUESTS",
    "PEER_QUARANTINED",
    "RESOLVE_DURATION",
    "UPLOADS_ACTIVE",
    "UPLOADS_BUSY",
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
# Not in Spegel (no claims, no upload bound): a burst's one-upstream-copy protocol (registry.claim).
CLAIM_OUTCOMES = Counter(
    "spegla_claim_outcomes_total",
    "Blob mirror requests by how the claim protocol ended them: fetch (a provider was found, "
    "possibly after waiting), claimant (this node fetches upstream for the burst), wait_timeout "
    "(the claimant's download never appeared), miss (no provider, no claim), deadline (the "
    "request's overall bound, --mirror-request-deadline, or its client's departure ended the "
    "wait first).",
    ["outcome"],
)
CLAIM_WAIT = Histogram(
    "spegla_claim_wait_duration_seconds",
    "Time a blob mirror request spent finding a provider or deciding to miss (claims included).",
    ["outcome"],
    buckets=(0.005, 0.01, 0.02, 0.04, 0.06, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
UPLOADS_ACTIVE = Gauge(
    "spegla_peer_uploads_active",
    "Blob GETs from peers being served right now (bounded by --peer-upload-limit).",
)
UPLOADS_BUSY = Counter(
    "spegla_peer_uploads_busy_total",
    "Blob GETs from peers answered 429 (busy) because the upload limit was reached.",
)
