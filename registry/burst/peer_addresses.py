"""Where peer requests may go: a pure policy on the addresses a provider record names.

Why its own module: provider records (and the "more addresses" they carry) come from the DHT, so
an address in one is input, not a fact.  A peer request carries credentials and is answered with
bytes this node's containerd may run; it must reach an agent on the cluster network, never a
host-local service that happens to answer HTTP: the cloud metadata service, link-local and
multicast addresses, the unspecified address, or a loopback address that names some other host's
loopback.  `peer_address_allowed` decides for one address, `allowed_hosts` for one peer; the
mirror path applies them before it dials (`registry.mirror.peer_transfer`).

Loopback is allowed only when this node is itself reachable on loopback (every agent on one host,
as in local test clusters): the agent decides that from its own advertised address.
"""

from __future__ import annotations

import ipaddress

from registry.interfaces import Peer

__all__ = ["METADATA_ADDRESSES", "allowed_hosts", "peer_address_allowed"]

# cloud instance-metadata endpoints that are not link-local (169.254.169.254, used by AWS, GCP and
# Azure, is covered by the link-local rule): AWS over IPv6 and Alibaba Cloud
METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("fd00:ec2::254"), ipaddress.ip_address("100.100.100.200")}
)


def peer_address_allowed(host: str, *, allow_loopback: bool = False) -> bool:
    """May a peer request be sent to the IP literal `host`?  Names and garbage: no."""
    try:
        address = ipaddress.ip_address(host.strip())
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            return False  # zone ids only make sense for link-local addresses
        mapped = address.ipv4_mapped
        if mapped is not None:
            return peer_address_allowed(str(mapped), allow_loopback=allow_loopback)
    if address in METADATA_ADDRESSES:
        return False
    if address.is_link_local or address.is_multicast or address.is_unspecified:
        return False
    if isinstance(address, ipaddress.IPv4Address) and address == ipaddress.IPv4Address(
        "255.255.255.255"
    ):
        return False
    return allow_loopback or not address.is_loopback


def allowed_hosts(peer: Peer, *, allow_loopback: bool = False) -> tuple[str, ...]:
    """The addresses of `peer` a request may be sent to, the record's own address first."""
    return tuple(
        dict.fromkeys(
            host for host in peer.hosts if peer_address_allowed(host, allow_loopback=allow_loopback)
        )
    )
