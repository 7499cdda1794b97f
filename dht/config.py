"""The protocol's settings and counters, kept apart from the state machine that uses them.

Why: the driver, the simulator and the bench build configurations and read statistics without
needing the protocol's internals.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from dht.addresses import MAX_MORE_HOSTS
from dht.ids import ID_BYTES, RecordState


@dataclass(frozen=True, slots=True)
class ProtocolConfig:
    node_id: bytes
    registry_port: int
    k: int = 20
    alpha: int = 3
    ttl: float = 600.0  # how long others keep our records
    refresh: float = 540.0  # how often we re-announce our keys
    # in-flight and claim records describe a transfer of seconds to minutes: they lapse soon after
    # their node stops refreshing them (it died), and are dropped at once when withdrawn
    inflight_ttl: float = 60.0
    inflight_refresh: float = 20.0
    claim_ttl: float = 15.0
    claim_refresh: float = 5.0
    psk: bytes | None = None  # cluster pre-shared key: HMAC on every datagram
    # other IPs our registry answers on, named in our records beside the address our datagrams
    # come from (dht.addresses); peers dial them in a race
    more_hosts: tuple[str, ...] = ()
    rpc_stall: float = 0.01  # a lookup stops waiting for a request after this and asks someone else
    rpc_timeout: float = 0.5  # after this a request has failed
    rate: float = 2000.0  # datagrams per second per source IP
    burst: float = 4000.0
    announce_concurrency: int = 8  # announce jobs (lookup + ADD_PROVIDERs) running at once
    announce_rate: float = 50.0  # announce jobs started per second, at most (after a burst)
    announce_burst: float = 50.0
    bucket_refresh: float = 900.0  # refresh a bucket nobody looked into for this long
    maintenance_every: float = 30.0
    join_refresh: int = 3  # after joining, fill this many of the farthest buckets (half the space…)

    def __post_init__(self) -> None:
        if len(self.node_id) != ID_BYTES:
            raise ValueError("node_id must be 32 bytes")
        if not 0 < self.registry_port < 65536:
            raise ValueError("registry_port must be in 1..65535")
        if not (0 < self.refresh and 0 < self.ttl):
            raise ValueError("refresh and ttl must be positive")
        for refresh, ttl in (
            (self.refresh, self.ttl),
            (self.inflight_refresh, self.inflight_ttl),
            (self.claim_refresh, self.claim_ttl),
        ):
            if not 0 < refresh < ttl:
                raise ValueError(
                    "each refresh must be positive and shorter than its ttl, or records lapse"
                )
        if self.announce_rate <= 0 or self.announce_burst < 1:
            raise ValueError("announce_rate must be positive and announce_burst at least 1")
        if self.k < 1 or self.alpha < 1 or self.announce_concurrency < 1:
            raise ValueError("k, alpha and announce_concurrency must be at least 1")
        if len(self.more_hosts) > MAX_MORE_HOSTS:
            raise ValueError(f"at most {MAX_MORE_HOSTS} more addresses")
        for host in self.more_hosts:
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(f"not an IP address: {host!r}") from None
            if "%" in host or str(ip) != host:  # goes on the wire packed: no zone, one spelling
                raise ValueError(f"not a plain canonical IP address: {host!r}")

    def ttl_for(self, state: RecordState) -> float:
        if state is RecordState.INFLIGHT:
            return self.inflight_ttl
        if state is RecordState.CLAIM:
            return self.claim_ttl
        return self.ttl

    def refresh_for(self, state: RecordState) -> float:
        if state is RecordState.INFLIGHT:
            return self.inflight_refresh
        if state is RecordState.CLAIM:
            return self.claim_refresh
        return self.refresh


@dataclass(frozen=True, slots=True)
class Statistics:
    table_size: int
    records_held: int
    keys_advertised: int
    announces_queued: int
    lookups_active: int
    rpcs_in_flight: int
    rpcs_sent: int
    rpcs_received: int
    rpcs_timed_out: int
    bad_datagrams: int
    rate_limited: int
    tokens_refused: int
    unexpected_replies: int
    datagrams_sent: int
    datagrams_received: int
    # trust (docs/security/dht.md): replies sized to an unproven request; records refused for a
    # per-source quota; in-flight/claim records refused from an unproven sender; address changes
    # refused because the old address still answered (or the new one did not)
    replies_trimmed: int = 0
    records_refused_quota: int = 0
    claims_refused: int = 0
    moves_refused: int = 0
