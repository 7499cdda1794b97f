"""The Trio driver: one UDP socket, the core's timers, and the advertise/resolve face (`DhtRouter`).

Why thin: all decisions live in `dht.protocol`. This module only moves datagrams between the socket
and the core, sleeps (in a cancel scope, `trio.move_on_at`) until the core's next deadline, and
turns the core's lookup effects into `ProviderInfo`s for whoever is resolving. Sends are
non-blocking `sendto`: a full send buffer drops the datagram, which the protocol already tolerates
as loss.
"""

from __future__ import annotations

import errno
import logging
import math
import random
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from dht.config import ProtocolConfig, Statistics
from dht.effects import BootstrapDone, Effect, LookupDone, ProvidersFound, Send
from dht.ids import ProviderInfo, RecordState
from dht.protocol import DhtProtocol

logger = logging.getLogger(__name__)

RECV_BUFFER = 2048


@dataclass(frozen=True, slots=True)
class NodeConfig:
    node_id: bytes
    bind_host: str = "0.0.0.0"
    bind_port: int = 5001
    registry_port: int = 5000
    refresh: float = 540.0
    ttl: float = 600.0
    psk: bytes | None = None
    standalone: bool = False  # alone by configuration: ready without any peer
    k: int = 20
    alpha: int = 3
    rpc_stall: float = 0.01
    rpc_timeout: float = 0.5
    rate: float = 2000.0  # datagrams/s accepted per source IP
    burst: float = 4000.0
    more_hosts: tuple[str, ...] = ()  # other IPs our registry answers on (dht.addresses)

    def protocol_config(self) -> ProtocolConfig:
        return ProtocolConfig(
            node_id=self.node_id,
            registry_port=self.registry_port,
            k=self.k,
            alpha=self.alpha,
            ttl=self.ttl,
            refresh=self.refresh,
            psk=self.psk,
            rpc_stall=self.rpc_stall,
            rpc_timeout=self.rpc_timeout,
            rate=self.rate,
            burst=self.burst,
            more_hosts=self.more_hosts,
        )


@dataclass(frozen=True, slots=True)
class ContactView:
    """A known contact, for the debug page."""

    node_id: str  # hex
    host: str
    port: int


def _normalize(addr: Any) -> tuple[str, int]:
    host, port = addr[0], addr[1]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]  # an IPv4 peer seen through a dual-stack socket
    return (host, port)


class _Sink(Protocol):
    """Where one lookup's results go (`Node._streams`): a pulled stream or a pushed watch."""

    def push(self, peers: Iterable[ProviderInfo]) -> None: ...

    def finish(self) -> None: ...


class _PeerStream:
    """Providers of one lookup, as an async iterator; ends when the lookup has converged.

    Each `__anext__` is one checkpoint: the wait for the next item when there is none yet, or a
    bare checkpoint when one is already there (a woken reader does not yield a second time).
    """

    def __init__(self) -> None:
        self._queue: deque[ProviderInfo] = deque()
        self._done = False
        self._wakeup = trio.Event()

    def push(self, peers: Iterable[ProviderInfo]) -> None:
        self._queue.extend(peers)
        self._wakeup.set()

    def finish(self) -> None:
        self._done = True
        self._wakeup.set()

    def __aiter__(self) -> _PeerStream:
        return self

    async def __anext__(self) -> ProviderInfo:
        waited = False
        while True:
            if self._queue:
                if not waited:
                    await trio.lowlevel.checkpoint()
                return self._queue.popleft()
            if self._done:
                if not waited:
                    await trio.lowlevel.checkpoint()
                raise StopAsyncIteration
            await self._wakeup.wait()
            waited = True
            self._wakeup = trio.Event()


class LookupWatch:
    """One lookup whose results are pushed to callbacks (`DhtRouter.watch`).

    The callbacks run synchronously in the node's receive or timer loop: an exception from one is
    logged here and never reaches those loops.  After `done`, or once `cancel`led, the watch is
    out of the node's table and no callback runs again.
    """

    def __init__(
        self,
        node: Node,
        found: Callable[[ProviderInfo], None],
        done: Callable[[], None],
    ) -> None:
        self._node = node
        self._found = found
        self._done = done
        self._lookup_id: int | None = None  # set while in the node's table

    @property
    def active(self) -> bool:
        return self._lookup_id is not None

    def push(self, peers: Iterable[ProviderInfo]) -> None:
        for peer in peers:
            if self._lookup_id is None:
                return  # cancelled by an earlier callback
            try:
                self._found(peer)
            except Exception:
                logger.exception("dht lookup callback failed", extra={"callback": "found"})

    def finish(self) -> None:
        if self._lookup_id is None:
            return
        self.cancel()
        try:
            self._done()
        except Exception:
            logger.exception("dht lookup callback failed", extra={"callback": "done"})

    def cancel(self) -> None:
        """Stop the lookup and its callbacks (idempotent; safe from inside a callback)."""
        lookup_id, self._lookup_id = self._lookup_id, None
        if lookup_id is not None:
            self._node._streams.pop(lookup_id, None)
            self._node.protocol.cancel_lookup(lookup_id)


class Node:
    def __init__(self, config: NodeConfig, *, rng: random.Random | None = None) -> None:
        self.config = config
        self.protocol = DhtProtocol(config.protocol_config(), rng)
        self.router = DhtRouter(self)
        self._sock: socket.socket | None = None
        self._bound: tuple[str, int] | None = None
        self._timer_changed = trio.Event()
        self._armed = math.inf
        self._streams: dict[int, _Sink] = {}  # running lookups' results (bounded by them)
        self._bootstraps: dict[int, trio.Event] = {}
        self._ready_waiters = trio.lowlevel.ParkingLot()  # DhtRouter.wait_ready

    # -- running ---------------------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind the UDP socket and run until cancelled; reports the bound (host, port) on start."""
        family = socket.AF_INET6 if ":" in self.config.bind_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 peers too
            sock.bind((self.config.bind_host, self.config.bind_port))
            self._sock = sock
            self._bound = _normalize(sock.getsockname())
            logger.info("dht listening", extra={"addr": f"{self._bound[0]}:{self._bound[1]}"})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive_loop, sock)
                nursery.start_soon(self._timer_loop)
                task_status.started(self._bound)
        finally:
            self._sock = None
            sock.close()
            for stream in list(self._streams.values()):  # a watch leaves the table as it ends
                stream.finish()
            for event in self._bootstraps.values():
                event.set()

    async def _receive_loop(self, sock: socket.socket) -> None:
        handled = 0
        while True:
            try:
                data, addr = sock.recvfrom(RECV_BUFFER)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError:  # e.g. an ICMP error queued on the socket
                await trio.lowlevel.checkpoint()
                continue
            try:
                effects = self.protocol.handle_datagram(data, _normalize(addr), trio.current_time())
                self._apply(effects)
            except Exception:  # a bug must not take the node down with it; it is logged loudly
                logger.exception("dht datagram handling failed", extra={"source": str(addr)})
                continue
            handled += 1
            # let a woken resolver run at once; otherwise yield now and then under a flood
            if handled % 64 == 0 or any(not isinstance(e, Send) for e in effects):
                await trio.lowlevel.checkpoint()

    async def _timer_loop(self) -> None:
        while True:
            deadline = self.protocol.next_deadline()
            self._armed = math.inf if deadline is None else deadline
            with trio.move_on_at(self._armed):
                await self._timer_changed.wait()
            self._timer_changed = trio.Event()
            self._apply(self.protocol.handle_timeouts(trio.current_time()))

    def _apply(self, effects: list[Effect]) -> None:
        sock = self._sock
        for effect in effects:
            if isinstance(effect, Send):
                if sock is None:
                    continue
                addr = effect.addr
                if sock.family == socket.AF_INET6 and ":" not in addr[0]:
                    addr = ("::ffff:" + addr[0], addr[1])  # an IPv4 peer from a dual-stack socket
                try:
                    sock.sendto(effect.data, addr)
                except BlockingIOError:
                    pass  # send buffer full: the same as a lost datagram
                except OSError as exc:
                    if exc.errno not in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EINVAL):
                        logger.debug("dht send failed", extra={"error": str(exc)})
            elif isinstance(effect, ProvidersFound):
                stream = self._streams.get(effect.lookup_id)
                if stream is not None:
                    stream.push(effect.providers)
            elif isinstance(effect, LookupDone):
                stream = self._streams.get(effect.lookup_id)
                if stream is not None:
                    stream.finish()
            elif isinstance(effect, BootstrapDone):
                event = self._bootstraps.pop(effect.job_id, None)
                if event is not None:
                    event.set()
        deadline = self.protocol.next_deadline()
        if deadline is not None and deadline < self._armed:
            self._armed = deadline
            self._timer_changed.set()
        if self._ready_waiters and self.router.ready():  # every table change comes through here
            self._ready_waiters.unpark_all()

    # -- public ----------------------------------------------------------------------------------

    @property
    def bound(self) -> tuple[str, int] | None:
        return self._bound

    async def bootstrap(self, addrs: Iterable[tuple[str, int]]) -> None:
        """Join through `addrs` (host or IP, port); returns once this first attempt is over."""
        if self._sock is None:
            raise RuntimeError("Node.bootstrap needs a running Node.serve")
        resolved: list[tuple[str, int]] = []
        for host, port in addrs:
            try:
                infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            except OSError as exc:
                logger.warning(
                    "dht bootstrap address not resolved", extra={"host": host, "error": str(exc)}
                )
                continue
            for info in infos:
                addr = _normalize(info[4])
                if addr not in resolved:
                    resolved.append(addr)
        job_id, effects = self.protocol.bootstrap(resolved, trio.current_time())
        done = self._bootstraps[job_id] = trio.Event()
        self._apply(effects)
        await done.wait()
        logger.info(
            "dht bootstrap attempt finished",
            extra={"seeds": len(resolved), "table_size": len(self.protocol.table)},
        )

    def statistics(self) -> Statistics:
        return self.protocol.statistics()

    def contacts(self) -> list[ContactView]:
        table = self.protocol.table
        return [ContactView(c.node_id.hex(), c.host, c.port) for c in table.contacts()]


class DhtRouter:
    """Advertise and resolve over a running `Node` (the agent adapts it to the registry)."""

    def __init__(self, node: Node) -> None:
        self._node = node

    def ready(self) -> bool:
        return self._node.config.standalone or len(self._node.protocol.table) > 0

    def lookups_reach_all(self) -> bool:
        """True while this node knows fewer than k contacts: a lookup converges only once the
        k nearest are asked, so every lookup asks every node it knows or learns of."""
        protocol = self._node.protocol
        return len(protocol.table) < protocol.config.k

    async def wait_ready(self) -> None:
        """Return once `ready()`: woken when the node's table changes, never polled."""
        await trio.lowlevel.checkpoint()
        while not self.ready():
            await self._node._ready_waiters.park()

    async def advertise(
        self, keys: Iterable[str], state: RecordState = RecordState.COMPLETE
    ) -> None:
        """Advertise `keys` (stored here at once, announced by sends without waiting): one
        checkpoint, the only yield of an uncontended claim's publication."""
        node = self._node
        node._apply(node.protocol.advertise(list(keys), trio.current_time(), state))
        await trio.lowlevel.checkpoint()

    async def withdraw(self, keys: Iterable[str]) -> None:
        node = self._node
        node._apply(node.protocol.withdraw(list(keys), trio.current_time()))
        await trio.lowlevel.checkpoint()

    def known_providers(self, key: str) -> list[ProviderInfo]:
        """Providers of `key` this node already holds records of: no round trip, no waiting."""
        return self._node.protocol.known_providers(key, trio.current_time())

    @asynccontextmanager
    async def resolve(self, key: str) -> AsyncIterator[AsyncIterator[ProviderInfo]]:
        node = self._node
        stream = _PeerStream()
        if node._sock is None:
            stream.finish()  # not serving: nobody can be asked
            yield stream
            return
        lookup_id, effects = node.protocol.start_resolve(key, trio.current_time())
        node._streams[lookup_id] = stream
        try:
            node._apply(effects)
            yield stream
        finally:
            del node._streams[lookup_id]
            node.protocol.cancel_lookup(lookup_id)

    def watch(
        self,
        key: str,
        found: Callable[[ProviderInfo], None],
        done: Callable[[], None],
    ) -> LookupWatch:
        """Look `key` up, pushing each provider to `found` and the end to `done`, both called
        synchronously from the node's loops (no task, no wake-up in between).  Providers this
        node already knows may arrive before this returns; so may `done` when the node is not
        serving.  `cancel()` the result when its reader is gone; it leaves on its own once done."""
        node = self._node
        watch = LookupWatch(node, found, done)
        if node._sock is None:
            watch._lookup_id = -1  # not serving: nobody can be asked
            watch.finish()
            return watch
        lookup_id, effects = node.protocol.start_resolve(key, trio.current_time())
        watch._lookup_id = lookup_id
        node._streams[lookup_id] = watch
        node._apply(effects)
        return watch
