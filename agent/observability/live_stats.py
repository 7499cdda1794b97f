"""The numbers behind "what is the mirror doing right now": hit ratio over the last 5 minutes, bytes
received from peers and served, per-peer traffic, a throughput series, transfers in progress.

Why sans-IO: these are running sums over timestamped observations (mirror results, sampled byte
counters, transfer progress), so they are plain methods taking `now`, tested with made-up clocks;
`agent.observability.debug` feeds them and puts their views into the debug snapshot that the page
and `spegla watch` show. Memory is bounded: per-second buckets for `history` seconds, the last
`window` seconds of outcomes, at most `max_peers` peers and `max_transfers` transfers.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from cachetools import LRUCache

HIT_WINDOW = 300.0  # seconds: "hit ratio over the last 5 minutes"


def host_of(address: str) -> str:
    """`10.0.0.2:5000` / `[fd00::2]:5000` / `fd00::2` -> the host: one row per peer, whichever
    port (registry port for fetches, client port or none for uploads) an observation named."""
    if address.startswith("["):
        return address[1 : address.find("]")]
    if address.count(":") == 1:
        return address.split(":", 1)[0]
    return address


@dataclass(slots=True)
class PeerTraffic:
    peer: str  # host
    bytes_in: int = 0  # received from this peer for our mirror requests
    bytes_out: int = 0  # served to this peer
    requests: int = 0  # our mirror requests it answered or failed
    errors: int = 0
    last: float = 0.0


@dataclass(frozen=True, slots=True)
class Transfer:
    """One blob moving between this node and a peer, as the page and `spegla watch` show it."""

    id: str
    key: str
    peer: str
    direction: str  # "in" (we fetch from peer) | "out" (we serve a peer)
    bytes: int
    total: int | None
    started: float
    state: str = "running"  # "running" | "done" | "failed"
    source: str = "complete"  # the provider's record: "complete" | "inflight"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class LiveStats:
    history: int = 600  # seconds of throughput kept
    window: float = HIT_WINDOW
    max_peers: int = 256
    max_transfers: int = 64
    bytes_in_total: int = 0
    bytes_out_total: int = 0
    _outcomes: deque[tuple[float, bool]] = field(default_factory=deque)
    _buckets: deque[list[int]] = field(default_factory=deque)  # [second, in, out]
    # the least recently touched peer / transfer is forgotten first (cachetools' LRU order)
    _peers: LRUCache[str, PeerTraffic] = field(init=False, repr=False)
    _transfers: LRUCache[str, Transfer] = field(init=False, repr=False)
    _finished: deque[Transfer] = field(default_factory=lambda: deque(maxlen=8))

    def __post_init__(self) -> None:
        self._peers = LRUCache(maxsize=max(1, self.max_peers))
        self._transfers = LRUCache(maxsize=max(1, self.max_transfers))

    # --- observations -----------------------------------------------------------------------

    def mirrored(self, at: float, outcome: str, peer: str, nbytes: int) -> None:
        """One mirror request ended: `hit` served from `peer` (nbytes received), else not."""
        self._outcomes.append((at, outcome == "hit"))
        self._trim(at)
        if nbytes > 0:
            self.bytes_in_total += nbytes
            self._bucket(at)[1] += nbytes
        if peer:
            traffic = self._peer(peer)
            traffic.requests += 1
            traffic.bytes_in += max(0, nbytes)
            traffic.errors += outcome == "error"
            traffic.last = max(traffic.last, at)

    def served(self, at: float, nbytes: int) -> None:
        """Bytes the registry sent (to containerd or to a peer: `served_to` says which peer)."""
        if nbytes <= 0:
            return
        self.bytes_out_total += nbytes
        self._bucket(at)[2] += nbytes

    def served_to(self, at: float, client: str, nbytes: int) -> None:
        """Bytes of a finished upload to `client`: per-peer only (totals come from `served`)."""
        if client and nbytes > 0:
            traffic = self._peer(client)
            traffic.bytes_out += nbytes
            traffic.last = max(traffic.last, at)

    def transfer(self, t: Transfer) -> Transfer:
        """Start or update a transfer (same id); a finished one leaves the current list."""
        if t.state == "running":
            self._transfers[t.id] = t
        else:
            self._transfers.pop(t.id, None)
            self._finished.append(t)
        return t

    def progress(self, transfer_id: str, nbytes: int) -> Transfer | None:
        current = self._transfers.get(transfer_id)
        if current is None:
            return None
        updated = replace(current, bytes=nbytes)
        self._transfers[transfer_id] = updated
        return updated

    # --- views -------------------------------------------------------------------------------

    def summary(self, now: float) -> dict[str, Any]:
        self._trim(now)
        recent = [hit for at, hit in self._outcomes if at >= now - self.window]
        hits = sum(recent)
        in_bps, out_bps = self.rates(now)
        return {
            "requests_5m": len(recent),
            "hits_5m": hits,
            "hit_ratio_5m": round(hits / len(recent), 4) if recent else None,
            "bytes_in_total": self.bytes_in_total,
            "bytes_out_total": self.bytes_out_total,
            "in_bps": in_bps,
            "out_bps": out_bps,
        }

    def rates(self, now: float, span: int = 5) -> tuple[float, float]:
        """Bytes per second in and out over the last `span` whole seconds."""
        first = int(now) - span
        got_in = got_out = 0
        for second, b_in, b_out in self._buckets:
            if first <= second < int(now):
                got_in += b_in
                got_out += b_out
        return round(got_in / span, 1), round(got_out / span, 1)

    def throughput(self, now: float, seconds: int = 300, step: int = 5) -> list[dict[str, Any]]:
        """[{"t": start second, "in": B/s, "out": B/s}] for the last `seconds` in `step`-s bins,
        the last one being the current (partial) bin, averaged over its elapsed seconds."""
        current = int(now) - int(now) % step
        start = current - seconds + step
        bins = {t: [0, 0] for t in range(start, current + step, step)}
        for second, b_in, b_out in self._buckets:
            t = second - second % step
            if t in bins:
                bins[t][0] += b_in
                bins[t][1] += b_out
        out = []
        for t, (b_in, b_out) in sorted(bins.items()):
            span = step if t < current else max(1.0, now - current)
            out.append({"t": t, "in": round(b_in / span, 1), "out": round(b_out / span, 1)})
        return out

    def peer_traffic(self) -> list[dict[str, Any]]:
        rows = sorted(self._peers.values(), key=lambda p: -(p.bytes_in + p.bytes_out))
        return [asdict(p) for p in rows]

    def transfers(self) -> list[dict[str, Any]]:
        return [t.as_dict() for t in self._transfers.values()]

    def finished(self) -> list[dict[str, Any]]:
        return [t.as_dict() for t in self._finished]

    # --- internals ---------------------------------------------------------------------------

    def _bucket(self, at: float) -> list[int]:
        second = int(at)
        if self._buckets and self._buckets[-1][0] == second:
            return self._buckets[-1]
        if self._buckets and self._buckets[-1][0] > second:  # late observation: find its second
            for bucket in reversed(self._buckets):
                if bucket[0] == second:
                    return bucket
                if bucket[0] < second:
                    break
            return [second, 0, 0]  # too old or between buckets: counted in totals only
        bucket = [second, 0, 0]
        self._buckets.append(bucket)
        while self._buckets and self._buckets[0][0] < second - self.history:
            self._buckets.popleft()
        return bucket

    def _trim(self, now: float) -> None:
        while self._outcomes and self._outcomes[0][0] < now - self.window:
            self._outcomes.popleft()

    def _peer(self, address: str) -> PeerTraffic:
        peer = host_of(address)
        traffic = self._peers.get(peer)
        if traffic is None:
            traffic = self._peers[peer] = PeerTraffic(peer)
        return traffic
