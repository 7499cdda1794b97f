"""Finding the first DHT peers: static list, DNS (headless Service), HTTP `/id`, or a Kubernetes
Lease leader; and the loop that keeps this node joined.

Why separate from the DHT: how a cluster introduces its nodes is deployment policy, not protocol.
Each kind answers `get()` with seed endpoints `(host, DHT port)`; `keep_joined` feeds them to the
node until its routing table is non-empty, with backoff (50 ms -> 10 s, like Spegel), and re-joins
when the table empties or every 30 minutes. The DNS kind sorts and caps records (3 per family) so
every node picks the same seeds and the network cannot split.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import h11
import trio

from agent.config import ConfigError, HostPort, ListenAddr, parse_peer

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
    """A minimal HTTP/1.1 GET (status, body, peer IP) over Trio; bounded body; plain http only."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise BootstrapError(f"only http:// bootstrap URLs are supported, got {url!r}")
    port = parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.netloc
    stream = await trio.open_tcp_stream(parts.hostname, port)
    async with stream:
        peer_ip = str(stream.socket.getpeername()[0])
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="GET",
            target=path,
            headers=[("Host", host_header), ("Connection", "close"), ("User-Agent", "spegla")],
        )
        await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        status = 0
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_body:
                    raise BootstrapError(f"answer from {url} is larger than {max_body} bytes")
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        return status, bytes(body), peer_ip


class HttpBootstrap:
    """Serves this node's `/id` (when `serve_addr` is set) and fetches seeds from `url`."""

    def __init__(self, self_info: SelfInfo, serve_addr: ListenAddr | None, url: str) -> None:
        self.self_info = self_info
        self.serve_addr = serve_addr
        self.url = url
        self.bound_port: int | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.serve_addr is None:
            task_status.started()
            await trio.sleep_forever()
        listeners = await trio.open_tcp_listeners(
            self.serve_addr.port, host=self.serve_addr.host or None
        )
        self.bound_port = int(listeners[0].socket.getsockname()[1])
        logger.info("serving bootstrap /id", extra={"port": self.bound_port})
        async with trio.open_nursery() as nursery:
            task_status.started()
            nursery.start_soon(trio.serve_listeners, self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_after(HTTP_TIMEOUT):
                try:
                    await self._answer(stream)
                except (trio.BrokenResourceError, h11.ProtocolError) as exc:
                    logger.debug("bootstrap request failed", extra={"error": repr(exc)})

    async def _answer(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                if not data:
                    return
                continue
            break
        if not isinstance(event, h11.Request):
            return
        local_ip = str(stream.socket.getsockname()[0])
        if event.method == b"GET" and event.target.split(b"?")[0] == b"/id":
            status, body, ctype = 200, id_document(self.self_info, local_ip), "application/json"
        else:
            status, body, ctype = 404, b"not found\n", "text/plain"
        headers = [
            ("Content-Type", ctype),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
        out = conn.send(h11.Response(status_code=status, headers=headers))
        out += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
        await stream.send_all(out)

    async def get(self) -> list[HostPort]:
        if not self.url:
            return []
        with trio.move_on_after(HTTP_TIMEOUT) as scope:
            try:
                status, body, peer_ip = await http_get(self.url)
            except (OSError, h11.ProtocolError, trio.BrokenResourceError) as exc:
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
