"""Per-request bookkeeping: Spegel's HTTP metrics and the access log line.

Why its own module: this holds the one definition of the `handler` labels, the metric updates and
the DEBUG access line, plus the ASGI middleware that applies them to every request the app serves
(bytes counted from body and zerocopysend messages alike, so both servers count the same).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from typing import Any
from urllib.parse import parse_qs

from registry.metrics import (
    HTTP_INFLIGHT,
    HTTP_REQUEST_DURATION,
    HTTP_RESPONSE_SIZE,
    method_label,
)

__all__ = [
    "TrustedProxies",
    "access_handler",
    "access_logger",
    "client_ip",
    "handler_label",
    "log_access",
    "parse_trusted_proxies",
    "with_request_metrics",
]

# One DEBUG line per request (Spegel's request log).  Its own logger so that its level can stay
# at the configured one while the agent opens `registry` up to DEBUG for the debug page's tap:
# callers check `access_logger.isEnabledFor(logging.DEBUG)` and skip all work when it is off.
access_logger = logging.getLogger("registry.access")
MAX_LOGGED_METHOD = 32  # a method is a token of any length; the log line keeps its start


def handler_label(path: str) -> str:
    """The `handler` label of the HTTP metrics: the route pattern, like Spegel's."""
    if path == "/v2" or path.startswith("/v2/"):
        return "/v2/*"
    return path if path in ("/readyz", "/livez") else "other"


def access_handler(path: str, mirrored: bool = False) -> str | None:
    """The access log's `handler` attribute (Spegel's names); None: not logged (probes)."""
    if path in ("/readyz", "/livez"):
        return None
    if path in ("/v2", "/v2/"):
        return "v2"
    if mirrored:
        return "mirror"
    if "/manifests/" in path:
        return "manifest"
    if "/blobs/" in path:
        return "blob"
    return "registry"


def log_access(
    *,
    handler: str,
    method: str,
    path: str,
    status: int,
    started: float,
    ip: str,
    registry: str,
    size: int,
) -> None:
    """The DEBUG access line of one request; call only when `access_logger` is enabled for DEBUG.

    Fields as Spegel's (`path`, `status`, `method`, `latency` in seconds, `ip`: the client as
    `client_ip` finds it, `handler`, `registry`: the `ns`), plus `bytes`.
    """
    access_logger.debug(
        "request",
        extra={
            "path": path,
            "status": status,
            "method": method[:MAX_LOGGED_METHOD],
            "latency": round(time.monotonic() - started, 6),
            "ip": ip,
            "handler": handler,
            "registry": registry,
            "bytes": size,
        },
    )


TrustedProxies = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
MAX_FORWARDED_HOPS = 16  # X-Forwarded-For entries looked at, from the right


def parse_trusted_proxies(text: str) -> TrustedProxies:
    """`--trusted-proxies`: comma-separated CIDRs or addresses; ValueError names a bad entry."""
    networks = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"not an IP address or CIDR: {entry[:64]!r}") from None
    return tuple(networks)


def _trusted(address: str, trusted: TrustedProxies) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in trusted)


def client_ip(forwarded_for: str | None, peer: str, trusted: TrustedProxies = ()) -> str:
    """The client a request is from: the connection's remote address, unless that is a trusted
    proxy (`--trusted-proxies`; none by default); then X-Forwarded-For is read from the right,
    past every trusted hop, and the first address not trusted is the client.  Without trusted
    proxies the header is ignored: anyone can send it, and it decides "is this my own
    containerd" (claims) and the logged client."""
    if not forwarded_for or not trusted or not _trusted(peer, trusted):
        return peer
    hop = peer
    for entry in reversed(forwarded_for.split(",")[-MAX_FORWARDED_HOPS:]):
        if not _trusted(hop, trusted):
            break
        try:
            hop = str(ipaddress.ip_address(entry.strip()))
        except ValueError:
            break  # garbage from beyond the last trusted hop: that hop is all we know
    return hop


def _log_asgi_access(
    scope: dict[str, Any], status: int, size: int, started: float, trusted: TrustedProxies
) -> None:
    path: str = scope["path"]
    handler = access_handler(path, bool(scope.get("spegla.mirrored")))
    if handler is None:
        return
    forwarded = None
    for name, value in scope.get("headers") or ():
        if name.lower() == b"x-forwarded-for":
            forwarded = value.decode("latin-1")
            break
    client = scope.get("client")
    ns = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("ns", [""])[0]
    log_access(
        handler=handler,
        method=scope["method"],
        path=path,
        status=status,
        started=started,
        ip=client_ip(forwarded, str(client[0]) if client else "", trusted),
        registry=ns,
        size=size,
    )


def with_request_metrics(asgi_app: Any, trusted: TrustedProxies = ()) -> Any:
    """ASGI middleware: inflight, duration (until the body is done) and bytes of every request,
    and the DEBUG access line when that is enabled (`trusted`: see `client_ip`)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await asgi_app(scope, receive, send)
            return
        handler, method = handler_label(scope["path"]), scope["method"]
        started = time.monotonic()
        status, size = 500, 0

        async def counting_send(message: dict[str, Any]) -> None:
            nonlocal status, size
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                size += len(message.get("body", b""))
            elif message["type"] == "http.response.zerocopysend":
                size += int(message.get("count") or 0)
            await send(message)

        _inflight_gauge(handler).inc()
        try:
            await asgi_app(scope, receive, counting_send)
        finally:
            _record(handler, method, str(status), size, started)
            if access_logger.isEnabledFor(logging.DEBUG):
                _log_asgi_access(scope, status, size, started, trusted)

    return app


# Each label combination's children, looked up once (prometheus_client's `labels` takes a lock
# and builds a key per call).  Bounded: handlers, method labels and status codes are few; past
# the bound a combination is looked up each time.
MAX_CACHED_LABELS = 1024
_inflight: dict[str, Any] = {}
_observed: dict[tuple[str, str, str], tuple[Any, Any]] = {}


def _inflight_gauge(handler: str) -> Any:
    gauge = _inflight.get(handler)
    if gauge is None:
        gauge = HTTP_INFLIGHT.labels(handler)
        if len(_inflight) < MAX_CACHED_LABELS:
            _inflight[handler] = gauge
    return gauge


def _record(handler: str, method: str, code: str, size: int, started: float) -> None:
    key = (handler, method_label(method), code)  # a client may send any token as its method
    children = _observed.get(key)
    if children is None:
        children = (HTTP_REQUEST_DURATION.labels(*key), HTTP_RESPONSE_SIZE.labels(*key))
        if len(_observed) < MAX_CACHED_LABELS:
            _observed[key] = children
    children[0].observe(time.monotonic() - started)
    children[1].observe(size)
    _inflight_gauge(handler).dec()
