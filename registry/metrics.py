"""Prometheus metrics of the registry, with Spegel's names and labels.

Why module-level: prometheus-client registers each metric once per process in its default
registry, which the agent's /metrics endpoint serves; every app instance in a process shares them.

Invariant: every label value that comes from a request passes through `method_label` or
`registry_label` first, so each label is drawn from a fixed set and the /metrics body stays small
whatever clients send (docs/decisions/bounded-metric-labels.md).
"""

from __future__ import annotations

from collections.abc import Iterable

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
    "method_label",
    "registry_label",
    "set_label_registries",
]

# the methods the registry answers (app.ALL_METHODS); anything else is counted as "other"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER = "other"
# registry labels when every registry is mirrored (no --mirrored-registries): the usual public ones
WELL_KNOWN_REGISTRIES = frozenset(
    {
        "docker.io",
        "ghcr.io",
        "quay.io",
        "registry.k8s.io",
        "gcr.io",
        "mcr.microsoft.com",
        "public.ecr.aws",
        "registry.gitlab.com",
        "nvcr.io",
        "k8s.gcr.io",
    }
)
_label_registries: frozenset[str] = WELL_KNOWN_REGISTRIES


def set_label_registries(registries: Iterable[str] | None) -> None:
    """The registries that get a label value of their own (the configured ones; None: every
    registry is mirrored, so the well-known public ones)."""
    global _label_registries
    _label_registries = WELL_KNOWN_REGISTRIES if registries is None else frozenset(registries)


def method_label(method: str) -> str:
    """A request's method as a label value: one the registry serves, else "other"."""
    return method if method in METHODS else OTHER


def registry_label(registry: str) -> str:
    """A request's registry (`ns`) as a label value: a configured one, else "other"."""
    return registry if registry in _label_registries else OTHER


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
# Not in Spegel (no claims, no upload bound): a burst's one-upstream-copy protocol
# (registry.burst.claim).
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
