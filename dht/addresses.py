"""A node's several addresses in its provider records (dual-stack IPv4 + IPv6, two interfaces).

Why its own module: the wire and the store know a provider by one IP (the address its
ADD_PROVIDER came from); a node reachable on more addresses names the others in a version-3
ADD_PROVIDER (`dht.codec`), the storing node keeps them in the record (`ProviderInfo.more_hosts`),
and a PROVIDERS reply lists the record once per address, the same node id each time: nodes that
only speak versions 1 and 2 read those as they always did (the first entry of a node wins their
lookup), newer ones group them again into one provider whose addresses the registry dials in a race.
These are the pure rules for that: which claimed addresses are kept, and the spreading and grouping
of a reply's entries.  `PlainContacts` remembers nodes that did not answer an ADD_PROVIDER naming
addresses (older agents drop version 3 as a bad datagram): they are sent the plain form for a while.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable

from cachetools import TTLCache

from dht.ids import ProviderInfo

__all__ = [
    "MAX_MORE_HOSTS",
    "UNSPECIFIED",
    "PlainContacts",
    "dialable",
    "each_address",
    "group_by_node",
    "kept_more_hosts",
    "reported",
]

UNSPECIFIED = ("0.0.0.0", "::")  # a provider entry meaning "at the address this reply came from"
MAX_MORE_HOSTS = 4  # other addresses a record keeps beside its source address
PLAIN_FOR = 600.0  # seconds a node that did not answer an ADD_PROVIDER naming addresses gets plain
PLAIN_MAX = 4096


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


# cloud metadata services that are not link-local (169.254.169.254 is, and is refused as such)
METADATA = frozenset(
    ipaddress.ip_address(a) for a in ("fd00:ec2::254", "100.100.100.200", "169.254.169.254")
)


def dialable(host: str, source: str) -> bool:
    """May a record learnt from `source` send peers to `host`?

    Never to an address that is not one host of the cluster network: unspecified, multicast,
    link-local (169.254/16, fe80::/10: the metadata service and other per-link services), a known
    metadata address, or loopback unless `source` is loopback itself (anything else would send
    peers to their own machine).  IPv4-mapped IPv6 addresses are judged as the IPv4 they carry.
    """
    ip = _ip(host)
    if ip is None:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast or ip.is_link_local or ip in METADATA:
        return False
    if ip.is_loopback:
        source_ip = _ip(source)
        if isinstance(source_ip, ipaddress.IPv6Address) and source_ip.ipv4_mapped is not None:
            source_ip = source_ip.ipv4_mapped
        return source_ip is not None and source_ip.is_loopback
    return True


def kept_more_hosts(claimed: Iterable[str], source: str) -> tuple[str, ...]:
    """The addresses an ADD_PROVIDER from `source` names that a record keeps.

    IP literals only, deduplicated, without `source` itself, each `dialable` from `source`; at most
    MAX_MORE_HOSTS.  (The caller accepts them only from an authenticated sender at all.)
    """
    kept: list[str] = []
    for text in claimed:
        ip = _ip(text)
        if ip is None or not dialable(text, source):
            continue
        host = str(ip)
        if host != source and host not in kept:
            kept.append(host)
        if len(kept) == MAX_MORE_HOSTS:
            break
    return tuple(kept)


def each_address(providers: Iterable[ProviderInfo]) -> tuple[ProviderInfo, ...]:
    """One wire entry per address: a record with `more_hosts` becomes several entries."""
    out: list[ProviderInfo] = []
    for p in providers:
        if not p.more_hosts:
            out.append(p)
            continue
        out.append(dataclasses.replace(p, more_hosts=()))
        out.extend(ProviderInfo(p.node_id, host, p.port, p.state) for host in p.more_hosts)
    return tuple(out)


def group_by_node(entries: Iterable[ProviderInfo]) -> tuple[ProviderInfo, ...]:
    """The entries of one reply, one provider per node: a node's later entries (same port and
    state) add their address to its first entry's `more_hosts`; others are ignored."""
    first: dict[bytes, ProviderInfo] = {}
    for entry in entries:
        known = first.get(entry.node_id)
        if known is None:
            first[entry.node_id] = entry
            continue
        if (
            entry.port != known.port
            or entry.state is not known.state
            or entry.host in known.hosts
            or len(known.more_hosts) >= MAX_MORE_HOSTS
        ):
            continue
        first[entry.node_id] = dataclasses.replace(
            known, more_hosts=(*known.more_hosts, entry.host)
        )
    return tuple(first.values())


def reported(
    entries: Iterable[ProviderInfo], sender: bytes, source: str, *, grouped: bool
) -> list[ProviderInfo]:
    """The providers a PROVIDERS reply from `sender` at `source` names, each only at addresses
    peers may be sent to (`dialable`); an unspecified address is the sender's own entry.

    `grouped` (with the cluster key): a node's several entries are one provider with all its
    addresses.  Without the key entries sharing an id may come from different senders, so each
    stays its own provider (an impostor's address never joins an honest node's)."""
    out = []
    for p in group_by_node(entries) if grouped else entries:
        if p.host in UNSPECIFIED:
            if p.node_id != sender:
                continue
            more_hosts = tuple(h for h in p.more_hosts if h != source)
            p = ProviderInfo(p.node_id, source, p.port, p.state, more_hosts)
        elif not dialable(p.host, source):
            continue
        if any(not dialable(h, source) for h in p.more_hosts):
            more = tuple(h for h in p.more_hosts if dialable(h, source))
            p = dataclasses.replace(p, more_hosts=more)
        out.append(p)
    return out


class PlainContacts:
    """Nodes that lately did not answer an ADD_PROVIDER naming addresses: they get the plain one.

    A node is plain for `hold` s after its last `add`; at most `max_nodes` are remembered (the
    expired, then the least recently used, go first). Sans-IO: `now` comes with every call and
    is the cache's clock (monotonic, as the protocol's is)."""

    def __init__(self, hold: float = PLAIN_FOR, max_nodes: int = PLAIN_MAX) -> None:
        self._now = 0.0
        self._nodes: TTLCache[bytes, bool] = TTLCache(
            maxsize=max_nodes, ttl=hold, timer=lambda: self._now
        )

    def add(self, node_id: bytes, now: float) -> None:
        self._now = now
        self._nodes[node_id] = True

    def __call__(self, node_id: bytes, now: float) -> bool:
        self._now = now
        return node_id in self._nodes
