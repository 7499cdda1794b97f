"""Dialling one peer that has several addresses: race the connects (happy eyeballs).

Why its own module: a node may be reachable on several addresses (dual-stack IPv4 and IPv6, two
interfaces); one of them may be a blackhole (a filtered family, an interface that is down), where a
connect hangs until the kernel gives up (a dropped SYN costs seconds).  As in RFC 8305 and Trio's
own `open_tcp_stream` for a name with several addresses, the first address is tried at once, the
next after `stagger` seconds or as soon as the one before failed, and so on; the first connect that
succeeds wins and every other attempt is cancelled by its cancel scope (its socket closed).
`dial_order` (pure) decides the order: the addresses as given, deduplicated, alternating between
address families starting with the first address's, so one broken family costs one stagger.

No timeouts inside: the caller bounds the whole dial with a cancel scope.  `registry.http.client`
puts the address that last won a peer's race first next time.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

import trio

__all__ = ["STAGGER", "connect_first", "dial_order"]

# RFC 8305 recommends 250 ms between attempts (at least 100 ms); peers are on the cluster network,
# where a connect that works completes in about a millisecond, so the lower bound is plenty.
STAGGER = 0.100


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def dial_order(hosts: Sequence[str]) -> list[str]:
    """`hosts` in the order to dial them: deduplicated, families interleaved, first one first."""
    unique = list(dict.fromkeys(h for h in hosts if h))
    if not unique:
        return []
    first = _family(unique[0])
    same = [h for h in unique if _family(h) == first]
    other = [h for h in unique if _family(h) != first]
    order: list[str] = []
    for i in range(max(len(same), len(other))):
        order.extend(group[i] for group in (same, other) if i < len(group))
    return order


async def _connect(host: str, port: int) -> trio.SocketStream:
    sock = trio.socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def connect_first(
    hosts: Sequence[str], port: int, *, stagger: float = STAGGER
) -> trio.SocketStream:
    """A TCP stream to the first of `hosts` (IP literals) that accepts a connect on `port`.

    Raises OSError naming every address's failure when none connects.
    """
    order = dial_order(hosts)
    if not order:
        raise OSError("no address to dial")
    if len(order) == 1:
        return await _connect(order[0], port)
    winner: trio.SocketStream | None = None
    errors: list[str] = []

    async def attempt(host: str, failed: trio.Event, nursery: trio.Nursery) -> None:
        nonlocal winner
        try:
            stream = await _connect(host, port)
        except OSError as exc:
            errors.append(f"{host}: {exc}")
            failed.set()
            return
        if winner is not None:  # connected in the same moment as the winner
            await trio.aclose_forcefully(stream)
            return
        winner = stream
        nursery.cancel_scope.cancel()  # the other attempts, and any attempt not yet started

    try:
        async with trio.open_nursery() as nursery:
            for host in order:
                failed = trio.Event()
                nursery.start_soon(attempt, host, failed, nursery)
                with trio.move_on_after(stagger):
                    await failed.wait()
    except BaseException:  # the caller gave up: a connect that won in that moment is closed
        if winner is not None:
            await trio.aclose_forcefully(winner)
        raise
    if winner is None:
        raise OSError("; ".join(errors) or "no address connected")
    return winner
