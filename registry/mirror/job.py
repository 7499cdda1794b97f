"""What a mirror request asks the `Forwarder` for, and the items it answers with.

Why its own module: these records are the contract between the app (the consumer, which turns them
into an HTTP response) and the forwarder (the producer task, which talks to peers).  Keeping them
apart lets each side be read without the other's machinery.  The order on the channel: first a
`MirrorHead` or a `MirrorFailure`, then body chunks, and finally nothing (success) or a
`MirrorAbort` (the response must be cut short).  `MirrorSettings` is the one place the mirror's
deadlines and limits get their defaults: the app's `RegistrySettings`, the agent's config and the
CLI's flag defaults all derive from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from registry.auth.peer import PeerAuth
from registry.mirror.buffers import Chunk
from registry.oci.distribution import ContentRequest, ErrorCode
from registry.oci.mediatypes import SNIFF_LIMIT
from registry.oci.ranges import RangeSpec

__all__ = [
    "MIRROR_DEFAULTS",
    "ItemSink",
    "ItemSource",
    "MirrorAbort",
    "MirrorFailure",
    "MirrorHead",
    "MirrorItem",
    "MirrorJob",
    "MirrorSettings",
]


@dataclass(frozen=True, slots=True)
class MirrorSettings:
    """How the mirror path waits for and fetches from peers (validated on construction)."""

    resolve_timeout: float = 0.020  # --mirror-resolve-timeout: each wait for a provider
    resolve_retries: int = 3  # --mirror-resolve-retries: failed attempts before giving up
    response_timeout: float = 2.0  # connect + headers from a peer (a dropped SYN costs 1 s)
    stall_timeout: float = 5.0  # no body bytes from a peer for this long = broken stream
    # Hedging (registry.mirror.peer_race): a provider that has not answered within the hedge delay
    # (a
    # recent p90 of answer times, clamped to [hedge_floor, hedge_ceiling]) gets company: the next
    # provider is asked too, up to hedge_racers at once; the first answer wins.  1 = no hedging.
    hedge_floor: float = 0.050
    hedge_ceiling: float = 0.500
    hedge_racers: int = 2
    # Several peers for one blob (registry.mirror.multi_peer): a blob of at least multi_peer_min
    # bytes
    # is fetched as ranges from up to multi_peer_max providers at once (1 = always one peer); a
    # head range with no progress for multi_peer_slow_after changes hands.
    multi_peer_max: int = 4
    multi_peer_min: int = 32 * 1024 * 1024
    multi_peer_slow_after: float = 1.0
    multi_peer_piece: int = 4 * 1024 * 1024  # one range (rounded to the buffer size)
    manifest_deadline: float = 3.0  # HEAD and manifest mirror requests finish within this
    # A blob GET finds a provider that answers (its response head checked) or answers 404
    # within this, claim waits and busy providers included (--mirror-request-deadline): after a
    # 404 containerd goes upstream, so a long wait is worse than a fast miss.  The body's
    # transfer is bounded by the stall and resume bounds instead.
    request_deadline: float = 5.0
    max_manifest_size: int = SNIFF_LIMIT
    user_agent: str = "spegla"
    # `Authorization` header value sent to peers (Basic auth configured on every agent); not
    # sent when `peer_auth` is set (the cluster key's per-request credentials replace it)
    authorization: str | None = None
    # the cluster key's peer credentials (registry.auth.peer); None: no key, so tags are never
    # resolved through peers (their answers cannot be vouched for)
    peer_auth: PeerAuth | None = None
    # peers on loopback addresses may be asked (registry.burst.peer_addresses): the agent allows it
    # only when it advertises a loopback address itself (all agents on one host)
    allow_loopback_peers: bool = True
    # a response not taking the next chunk for this long is abandoned (its client is gone, or it
    # never started reading); this also bounds how long a peer connection can be held for it
    consumer_timeout: float = 60.0
    # Blobs up to this size are fetched and verified in full before their first byte is sent, so
    # a lying peer costs a fail-over, never a poisoned download (containerd resumes a cut-off
    # body with Range and would stitch the bad prefix to good bytes from elsewhere).  Larger
    # blobs stream, hashed on the way, with the last byte held back until the digest matched.
    verify_first_max: int = 64 * 1024 * 1024
    # memory for peer bodies over all requests: verify-first blobs and streaming buffers
    buffer_memory: int = 256 * 1024 * 1024
    buffer_size: int = 1024 * 1024  # one socket read fills at most this (the pool's unit)
    # A blob streamed because it is bigger than verify_first_max is read in buffers of this many
    # bytes (a multiple of buffer_size); smaller blobs keep buffer_size buffers
    # (docs/decisions/stream-buffers.md).
    stream_buffer_size: int = 2 * 1024 * 1024
    # a peer answering 404 for a key it advertises is skipped for that key this long (its
    # provider records outlive a delete until their ttl; it may also pull the content again)
    stale_ttl: float = 60.0
    # A provider still downloading the blob (an in-flight record) sends bytes only as they reach
    # it, so its body may pause longer; it cuts the response itself after its own stall bound
    # (registry.serve.inflight, 10 s), which this stays above.  Its blobs always stream (any size),
    # hashed from byte 0 with the last byte held back: holding them whole would keep this node's
    # containerd from starting its own download, so it could not pass the bytes on in turn.
    inflight_stall_timeout: float = 15.0
    # Bursts (registry.burst.claim): a blob GET that finds no provider publishes a claim, lets
    # `claim_settle` pass, and the lowest-ranked claimant goes upstream while the others wait up
    # to `claim_wait` for its download to appear (looking again every `claim_poll`), and never
    # past `request_deadline`.
    claim_settle: float = 0.020
    claim_wait: float = 10.0
    claim_poll: float = 0.1
    # A blob body already partly sent whose providers all failed: the mirror keeps looking (fresh
    # lookups every `resume_interval`) for this long before cutting it (a provider's agent
    # restarting takes a few seconds; after the cut containerd resumes with a Range request, here
    # first, then upstream); less when every provider there refuses for good
    # (registry.burst.own_downloads).  The bound counts from the last byte that got further, so
    # sources that stall again do not extend it.
    resume_patience: float = 20.0
    resume_interval: float = 0.5

    def __post_init__(self) -> None:
        if not self.resolve_timeout > 0 or not math.isfinite(self.resolve_timeout):
            raise ValueError("resolve_timeout must be a positive number of seconds")
        if self.resolve_retries < 1:
            raise ValueError("resolve_retries must be at least 1")
        if not 0 < self.hedge_floor <= self.hedge_ceiling or not math.isfinite(self.hedge_ceiling):
            raise ValueError("hedging needs 0 < hedge_floor <= hedge_ceiling")
        if self.hedge_racers < 1:
            raise ValueError("hedge_racers must be at least 1")
        if not 0 < self.request_deadline < math.inf:
            raise ValueError("request_deadline must be a positive number of seconds")
        if not self.inflight_stall_timeout > 0:
            raise ValueError("inflight_stall_timeout must be positive")
        if not 0 < self.claim_settle <= self.claim_wait or not 0 < self.claim_poll:
            raise ValueError(
                "claim_settle, claim_wait and claim_poll must be positive, settle <= wait"
            )
        if self.multi_peer_max < 1:
            raise ValueError("multi_peer_max must be at least 1")
        if self.stream_buffer_size < self.buffer_size or self.stream_buffer_size % self.buffer_size:
            raise ValueError("stream_buffer_size must be a multiple of buffer_size")


MIRROR_DEFAULTS = MirrorSettings()


@dataclass(frozen=True, slots=True)
class MirrorJob:
    request: ContentRequest
    method: str  # "GET" or "HEAD"
    range_spec: RangeSpec | None  # blobs only
    client_ip: str | None = None  # who asked (a claim is made only for this node's containerd)
    accept: str | None = None  # the request's Accept (containerd names the blob's media type)

    @property
    def claimable(self) -> bool:
        """Worth a burst claim: a layer, not a small JSON blob (an image config).

        containerd asks for a blob with ``Accept: <descriptor media type>, */*``.  A config is
        written in one go (its download is never seen in flight), so a claim on it would make
        the other nodes wait for the claimant's whole pull; they fetch it upstream instead.
        """
        first = (self.accept or "").split(",", 1)[0].strip().lower()
        return "json" not in first


@dataclass(frozen=True, slots=True)
class MirrorHead:
    status: int
    headers: tuple[tuple[str, str], ...]
    inflight: bool = False  # the answer comes from a provider that is still downloading it


@dataclass(frozen=True, slots=True)
class MirrorFailure:
    status: int
    code: ErrorCode
    message: str
    attempts: int
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class MirrorAbort:
    reason: str


# body bytes: a `Chunk` of a pooled buffer (the consumer releases it once written) or bytes
MirrorItem = MirrorHead | MirrorFailure | MirrorAbort | Chunk | bytes | bytearray


class ItemSink(Protocol):
    """Where a mirror run's items go: a request's channel, or a shared fetch
    (`registry.mirror.share`).  `send` waits while the reader is behind."""

    async def send(self, value: MirrorItem, /) -> None: ...


class ItemSource(Protocol):
    """Where a response takes a mirror run's items from: a shared fetch's reader
    (`registry.mirror.share.ShareReader`) or a request's channel.  `receive` raises
    `trio.EndOfChannel` after the last item; `close` stops the fetch if nobody else reads it."""

    async def receive(self) -> MirrorItem: ...

    def close(self) -> None: ...
