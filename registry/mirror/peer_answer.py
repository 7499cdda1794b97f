"""What a peer's answer says, and what the mirror remembers about peers that lied or lost content.

Why pure: the checks of peer answers (status, digest, size, ranges) and the memory of peers that
served bytes not matching a digest (`Quarantine`) or no longer hold a key they advertise
(`StaleProviders`) are where correctness lives; the Trio drivers in `registry.mirror` only
perform what these say.  Attempt counting is `registry.burst.attempts`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cachetools import LRUCache, TTLCache

from registry.burst.attempts import PeerKey
from registry.oci.ranges import ByteRange
from registry.oci.reference import ReferenceError, parse_digest

__all__ = [
    "PeerAnswer",
    "PeerAnswerError",
    "PeerBusy",
    "Quarantine",
    "StaleProviders",
    "check_peer_answer",
]


class Quarantine:
    """Peers caught serving bytes that do not match a digest, per digest (bounded LRU)."""

    def __init__(self, max_digests: int = 4096) -> None:
        self._entries: LRUCache[str, set[PeerKey]] = LRUCache(maxsize=max_digests)

    def add(self, digest: str, peer: PeerKey) -> None:
        peers = self._entries.get(digest)
        if peers is None:
            peers = self._entries[digest] = set()
        peers.add(peer)

    def peers(self, digest: str) -> frozenset[PeerKey]:
        return frozenset(self._entries.get(digest, ()))


class StaleProviders:
    """Peers that answered 404 for a key they advertise, remembered for `ttl` seconds.

    Such a peer deleted the content, but provider records stored for it elsewhere live on until
    their own ttl; without this memory every pull of the key would try it again, paying a round
    trip and one of its `resolve_retries` attempts.  Bounded: the oldest entries go first.  Times
    are the caller's clock (`now`), so this stays pure; the ttl is short because the peer may
    pull the content again.
    """

    def __init__(self, ttl: float = 60.0, max_entries: int = 4096) -> None:
        self._now = 0.0  # the caller's clock, as of the last call (the cache's timer reads it)
        self._entries: TTLCache[tuple[str, PeerKey], bool] = TTLCache(
            maxsize=max_entries, ttl=ttl, timer=lambda: self._now
        )

    def add(self, key: str, peer: PeerKey, now: float) -> None:
        self._now = now
        self._entries[(key, peer)] = True

    def peers(self, key: str, now: float) -> frozenset[PeerKey]:
        """The peers to skip for `key` at `now` (expired entries are dropped on the way)."""
        self._now = now
        self._entries.expire()
        return frozenset(peer for (k, peer) in self._entries if k == key)

    def __len__(self) -> int:
        return len(self._entries)


class PeerAnswerError(ValueError):
    """A peer's response headers cannot be used (wrong status, missing or inconsistent fields)."""


class PeerBusy(PeerAnswerError):
    """The peer is at its upload limit (429/503): ask another, try it again after `retry_after`."""

    def __init__(self, retry_after: float, refused: str = "") -> None:
        super().__init__(f"peer is busy (retry after {retry_after:g} s)")
        self.retry_after = retry_after
        # set when the peer cannot serve it at all now (registry.burst.own_downloads: "no-source",
        # "loop"), not merely at its upload limit
        self.refused = refused


@dataclass(frozen=True, slots=True)
class PeerAnswer:
    """What a usable peer response says about the content."""

    digest: str
    size: int  # full content size
    media_type: str
    offset: int  # first content byte in the body
    length: int  # body bytes (0 for HEAD)


def check_peer_answer(
    *,
    status: int,
    headers: dict[str, str],
    expected_digest: str | None,
    is_blob: bool,
    is_head: bool,
    requested: ByteRange | None,
    expected_size: int | None = None,
    vouch: Callable[[str], bool] | None = None,
) -> PeerAnswer:
    """Validate a peer's status and headers (lower-cased names) against what was asked for.

    `expected_digest` is the requested digest (None for a tag); `requested` the range asked of the
    peer (None: everything); `expected_size` the size learnt from an earlier peer, when resuming.
    Invariant: the digest a peer names for a tag is used only when `vouch(digest)` is true (the
    peer proved it holds the cluster key, `registry.auth.peer`); without `vouch` no tag answer is
    accepted.  A digest asked for needs no proof: its bytes are checked against it.
    """
    if requested is None and status != 200:
        raise PeerAnswerError(f"peer answered {status}")
    if requested is not None and status != 206:
        raise PeerAnswerError(f"peer answered {status} to a range request")
    digest_header = headers.get("docker-content-digest")
    if digest_header is None:
        if expected_digest is None or not is_blob:
            raise PeerAnswerError("peer sent no Docker-Content-Digest")
        digest_header = expected_digest
    try:
        digest = parse_digest(digest_header.strip())
    except ReferenceError as exc:
        raise PeerAnswerError(f"peer sent a bad Docker-Content-Digest: {exc}") from None
    if expected_digest is not None and digest != expected_digest:
        raise PeerAnswerError(f"peer sent digest {digest}, asked for {expected_digest}")
    if expected_digest is None and (vouch is None or not vouch(digest)):
        raise PeerAnswerError("peer's tag answer is not vouched for by the cluster key")
    media_type = headers.get("content-type")
    if media_type is None:
        if not is_blob:
            raise PeerAnswerError("peer sent no Content-Type for a manifest")
        media_type = "application/octet-stream"
    length = _non_negative(headers.get("content-length"), "Content-Length")
    if requested is None:
        size, offset = length, 0
    else:
        size, offset, last = _content_range(headers.get("content-range"))
        if offset != requested.start or last != requested.end or size != requested.size:
            raise PeerAnswerError("peer sent a Content-Range other than the one asked for")
        if length != last - offset + 1:
            raise PeerAnswerError("peer's Content-Length does not match its Content-Range")
    if expected_size is not None and size != expected_size:
        raise PeerAnswerError(f"peer has {size} bytes, another peer had {expected_size}")
    return PeerAnswer(digest, size, media_type, offset, 0 if is_head else length)


def _non_negative(value: str | None, name: str) -> int:
    text = "" if value is None else value.strip()
    # ASCII digits only: str.isdigit() also takes superscripts ("²"), which int() refuses
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        raise PeerAnswerError(f"peer sent a missing or bad {name}")
    return int(text)


def _content_range(value: str | None) -> tuple[int, int, int]:
    """`bytes a-b/size` -> (size, a, b)."""
    if value is None or not value.startswith("bytes "):
        raise PeerAnswerError("peer sent a missing or bad Content-Range")
    span, _, total = value[len("bytes ") :].partition("/")
    first, _, last = span.partition("-")
    size = _non_negative(total, "Content-Range")
    start = _non_negative(first, "Content-Range")
    end = _non_negative(last, "Content-Range")
    if start > end or end >= size:
        raise PeerAnswerError("peer sent an inconsistent Content-Range")
    return size, start, end
