"""Finding the first DHT peers: static list, DNS (headless Service), HTTP `/id`, or a Kubernetes
Lease leader; and the loop that keeps this node joined.

Why separate from the DHT: how a cluster introduces its nodes is deployment policy, not protocol.
Each kind answers `get()` with seed endpoints `(host, DHT port)`; `keep_joined` feeds them to the
node until its routing table is non-empty, with backoff (50 ms -> 10 s, like Spegel), and re-joins
when the table empties or every 30 minutes. The DNS kind sorts and caps records (3 per family) so
every node picks the same seeds and the network cannot split.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import trio
from quart import Response, request
from quart_trio import QuartTrio

from agent.config import ConfigError, HostPort, ListenAddr, parse_peer
from agent.observability.metrics_server import serve_app
from registry.http.client import PeerClient, PeerError

logger = logging.getLogger(__name__)

MAX_PER_FAMILY = 3
HTTP_TIMEOUT = 10.0
MAX_ID_BODY = 64 * 1024


class BootstrapError(Exception):
    """No seed peers could be obtained this round."""


@dataclass(frozen=True, slots=True)
class SelfInfo:
    """This node as others should reach it."""

    node_id: bytes
    host: str  # advertised IP ("" if unknown)
    port: int  # DHT port


class Bootstrapper(Protocol):
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve or elect whatever this kind needs; call started() at once; run until cancelled."""
        ...

    async def get(self) -> list[HostPort]:
        """Seed peers for this round (may include this node; the caller skips it)."""
        ...


class _Passive:
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()


class NoBootstrap(_Passive):
    """No seeds: the node waits to be contacted (or runs alone)."""

    async def get(self) -> list[HostPort]:
        return []


class StaticBootstrap(_Passive):
    def __init__(self, peers: Sequence[HostPort]) -> None:
        self.peers = list(peers)

    async def get(self) -> list[HostPort]:
        return list(self.peers)


# --- dns ---------------------------------------------------------------------------------------

Lookup = Callable[[str, socket.AddressFamily], Awaitable[list[str]]]


async def system_lookup(domain: str, family: socket.AddressFamily) -> list[str]:
    """Addresses of one family for `domain`, through the system resolver."""
    infos = await trio.socket.getaddrinfo(domain, None, family=family, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def pick_seeds(addresses: Sequence[str], limit: int = MAX_PER_FAMILY) -> list[str]:
    """Sort IPs numerically and keep the first `limit`; every node computes the same list."""
    unique = {ipaddress.ip_address(a) for a in addresses}
    return [str(a) for a in sorted(unique)[:limit]]


class DnsBootstrap(_Passive):
    """A and AAAA records of a headless Service; an error only if both lookups fail."""

    def __init__(self, domain: str, port: int, lookup: Lookup = system_lookup) -> None:
        self.domain = domain
        self.port = port
        self.lookup = lookup

    async def get(self) -> list[HostPort]:
        seeds: list[HostPort] = []
        errors: list[str] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                addresses = await self.lookup(self.domain, family)
            except (OSError, ValueError) as exc:
                errors.append(f"{family.name}: {exc}")
                continue
            seeds.extend(HostPort(ip, self.port) for ip in pick_seeds(addresses))
        if len(errors) == 2:
            raise BootstrapError(f"dns lookup of {self.domain} failed: {'; '.join(errors)}")
        return seeds


# --- http --------------------------------------------------------------------------------------


def id_document(self_info: SelfInfo, local_ip: str) -> bytes:
    """Body of `GET /id`: `[{"ID": hex id, "Addrs": ["ip:port"]}]` (Spegel's shape, our addrs)."""
    host = self_info.host or local_ip
    addrs = [str(HostPort(host, self_info.port))] if host else []
    return json.dumps([{"ID": self_info.node_id.hex(), "Addrs": addrs}]).encode()


def parse_id_document(body: bytes, fallback_host: str, port: int) -> list[tuple[str, HostPort]]:
    """(id, endpoint) pairs from an `/id` answer; first 3 entries; an entry without Addrs uses the
    host the document came from. Multiaddr-style `/ip4/x/...` addresses keep only the IP."""
    try:
        data: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BootstrapError(f"bootstrap answer is not JSON: {exc}") from None
    entries = data if isinstance(data, list) else [data]
    out: list[tuple[str, HostPort]] = []
    for entry in entries[:MAX_PER_FAMILY]:
        if not isinstance(entry, dict):
            raise BootstrapError("bootstrap answer entries must be objects")
        peer_id = str(entry.get("ID") or "")
        addrs = entry.get("Addrs") or []
        if not isinstance(addrs, list):
            raise BootstrapError("bootstrap answer: Addrs must be a list")
        endpoints: list[HostPort] = []
        for addr in addrs:
            try:
                endpoints.append(_endpoint(str(addr), port))
            except ConfigError as exc:
                logger.debug("skipping bootstrap address", extra={"addr": addr, "error": str(exc)})
        if not endpoints and fallback_host:
            endpoints.append(HostPort(fallback_host, port))
        out.extend((peer_id, endpoint) for endpoint in endpoints)
    return out


def _endpoint(addr: str, port: int) -> HostPort:
    if addr.startswith("/"):
        parts = addr.split("/")
        if len(parts) >= 3 and parts[1] in ("ip4", "ip6"):
            try:
                ipaddress.ip_address(parts[2])
            except ValueError:
                raise ConfigError(f"bad IP in {addr!r}") from None
            return HostPort(parts[2], port)
        raise ConfigError(f"unsupported multiaddr {addr!r}")
    return parse_peer(addr, default_port=port)


async def http_get(url: str, *, max_body: int = MAX_ID_BODY) -> tuple[int, bytes, str]:
    """GET `url` (plain http) with the registry's peer client: (status, body, peer IP).

    The body is bounded by `max_body`; a connection that cannot be made raises the OS's error
    (callers tell "refused" from "unreachable" by it); anything else is a BootstrapError. No
    timeout inside: callers bound it with a cancel scope.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise BootstrapError(f"only http:// bootstrap URLs are supported, got {url!r}")
    try:
        port = parts.port or 80
    except ValueError as exc:
        raise BootstrapError(f"bad port in {url!r}: {exc}") from None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = [("Connection", "close"), ("User-Agent", "spegla")]
    client = PeerClient()
    try:
        async with client.request(parts.hostname, port, "GET", target, headers) as response:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_body:
                raise BootstrapError(f"answer from {url} is larger than {max_body} bytes")
            body = bytearray()
            while (chunk := await response.receive()) is not None:
                body += chunk
                if len(body) > max_body:
                    raise BootstrapError(f"answer from {url} is larger than {max_body} bytes")
            return response.status, bytes(body), response.peer_ip
    except PeerError as exc:
        reason = exc.__context__
        if isinstance(reason, OSError):  # the connect itself failed: its error, causes kept
            raise reason from reason.__cause__
        raise BootstrapError(f"GET {url} failed: {exc}") from None
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()


def id_app(self_info: SelfInfo) -> QuartTrio:
    """`GET /id` answers this node's `id_document`; every other request is a plain 404."""
    app = QuartTrio("spegla-bootstrap")
    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

    @app.route("/", defaults={"path": ""}, methods=methods)
    @app.route("/<path:path>", methods=methods)
    async def answer(path: str) -> Response:
        if request.method == "GET" and path == "id":
            local_ip = str((request.scope.get("server") or ("",))[0] or "")
            body = id_document(self_info, local_ip)
            return Response(body, status=200, content_type="application/json")
        return Response(b"not found\n", status=404, content_type="text/plain")

    return app


class HttpBootstrap:
    """Serves this node's `/id` on its own address (when `serve_addr` is set: `--http-bootstrap-
    addr`, apart from the registry and metrics ports) and fetches seeds from `url`."""

    def __init__(self, self_info: SelfInfo, serve_addr: ListenAddr | None, url: str) -> None:
        self.self_info = self_info
        self.serve_addr = serve_addr
        self.url = url
        self.bound_port: int | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.serve_addr is None:
            task_status.started()
            await trio.sleep_forever()
        async with trio.open_nursery() as nursery:
            self.bound_port = await nursery.start(
                functools.partial(
                    serve_app,
                    id_app(self.self_info),
                    self.serve_addr,
                    shutdown_trigger=trio.sleep_forever,  # stops when cancelled
                    grace=0.0,
                )
            )
            logger.info("serving bootstrap /id", extra={"port": self.bound_port})
            task_status.started()

    async def get(self) -> list[HostPort]:
        if not self.url:
            return []
        with trio.move_on_after(HTTP_TIMEOUT) as scope:
            try:
                status, body, peer_ip = await http_get(self.url)
            except OSError as exc:
                raise BootstrapError(f"GET {self.url} failed: {exc}") from None
        if scope.cancelled_caught:
            raise BootstrapError(f"GET {self.url} timed out")
        if status != 200:
            raise BootstrapError(f"GET {self.url} answered {status}")
        own = self.self_info.node_id.hex()
        return [
            endpoint
            for peer_id, endpoint in parse_id_document(body, peer_ip, self.self_info.port)
            if peer_id != own
        ]


# --- kubernetes ----------------------------------------------------------------------------------


class KubernetesBootstrap:
    """The Lease leader is everyone's seed; each node competes with identity `ip:port`."""

    def __init__(self, elector: Any, port: int) -> None:
        self.elector = elector
        self.port = port

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.elector.run(task_status=task_status)

    async def get(self) -> list[HostPort]:
        leader = await self.elector.wait_leader()
        if leader == self.elector.identity:
            return []
        try:
            return [parse_peer(leader, default_port=self.port)]
        except ConfigError as exc:
            raise BootstrapError(f"lease holder {leader!r} is not host:port") from exc


# --- keeping the node joined -------------------------------------------------------------------

Join = Callable[[list[tuple[str, int]]], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class JoinTiming:
    initial_backoff: float = 0.05
    max_backoff: float = 10.0
    round_timeout: float = 30.0
    check_interval: float = 5.0
    rejoin_interval: float = 1800.0


def is_self(peer: HostPort, self_info: SelfInfo, local_hosts: Sequence[str] = ()) -> bool:
    if peer.port != self_info.port:
        return False
    return peer.host == self_info.host or peer.host in local_hosts


async def keep_joined(
    bootstrapper: Bootstrapper,
    join: Join,
    ready: Callable[[], bool],
    self_info: SelfInfo,
    timing: JoinTiming = JoinTiming(),
    local_hosts: Sequence[str] = (),
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bootstrap until `ready()`, with backoff; afterwards re-check periodically and re-join."""
    task_status.started()
    backoff = timing.initial_backoff
    last_join = trio.current_time()
    waiting_since: float | None = trio.current_time()
    while True:
        due = trio.current_time() - last_join >= timing.rejoin_interval
        if ready() and not due:
            if waiting_since is not None:
                logger.info(
                    "joined the network",
                    extra={"elapsed_s": round(trio.current_time() - waiting_since, 3)},
                )
                waiting_since = None
            await trio.sleep(timing.check_interval)
            continue
        if waiting_since is None and not due:
            logger.warning("routing table empty, bootstrapping again")
            waiting_since = trio.current_time()
        seeds: list[HostPort] = []
        with trio.move_on_after(timing.round_timeout):
            try:
                found = await bootstrapper.get()
                seeds = [p for p in found if not is_self(p, self_info, local_hosts)]
                if seeds:
                    await join([(p.host, p.port) for p in seeds])
            except (BootstrapError, OSError, ValueError) as exc:
                logger.warning("bootstrap round failed", extra={"error": str(exc)})
        if ready():
            last_join = trio.current_time()
            backoff = timing.initial_backoff
            continue
        logger.debug(
            "not joined yet", extra={"retry_in_s": backoff, "seeds": [str(p) for p in seeds]}
        )
        await trio.sleep(backoff)
        backoff = min(timing.max_backoff, backoff * 2)
