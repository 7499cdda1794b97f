"""Where this node's own downloads get their bytes, so a burst's tree never becomes a loop.

Why its own module: in a burst, nodes stream a layer from each other's downloads still in progress
(registry.serve.inflight).  If the node they all streamed from dies, two nodes holding the same
prefix could each resume from the other's stalled download and wait on each other for ever: neither
download grows, and neither node lets its containerd go upstream, because its response has begun.

So each blob the mirror streams to this node's containerd is recorded here with its current source
and the chain behind that source (the peers the source's own download comes from, as the source's
`Spegla-Fed-By` header says).  A peer asking for the same digest from this node's download in
progress is refused (busy, so it asks another provider) when it is in that chain (serving it would
close a loop), or when this node has no source at the moment (its bytes would never come).  The
requester then finds no live source either, cuts its body, and containerd resumes it with a Range
request that goes through the claim again: one node goes upstream for the rest.

Pure bookkeeping, no I/O: the forwarder updates it, the app's peer admission asks it.
"""

from __future__ import annotations

import ipaddress
import itertools
from dataclasses import dataclass

__all__ = ["FED_BY_HEADER", "REFUSED_HEADER", "Feed", "OwnDownloads", "Refusal", "parse_fed_by"]

FED_BY_HEADER = "Spegla-Fed-By"
# on a refusal (429): "no-source" or "loop", so the requester knows waiting for this peer is
# pointless (unlike a peer at its upload limit)
REFUSED_HEADER = "Spegla-Refused"
MAX_CHAIN = 16  # a longer chain is cut: refusing a loop past it is left to the stall bounds


@dataclass(frozen=True, slots=True)
class Feed:
    """One download's source now: a peer's host (None: looking for one), and who feeds it."""

    source: str | None
    chain: tuple[str, ...] = ()

    @property
    def hosts(self) -> tuple[str, ...]:
        """Every host this download's bytes pass through, nearest first."""
        return () if self.source is None else (self.source, *self.chain)[:MAX_CHAIN]


def parse_fed_by(value: str | None) -> tuple[str, ...]:
    """The hosts in a `Spegla-Fed-By` header: IP literals (`ipaddress`), anything else dropped,
    at most `MAX_CHAIN`."""
    if not value:
        return ()
    hosts = []
    for part in value.split(","):
        try:
            hosts.append(str(ipaddress.ip_address(part.strip())))
        except ValueError:
            continue
    return tuple(hosts[:MAX_CHAIN])


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a peer may not read this node's download: `kind` is "no-source" or "loop"."""

    kind: str
    message: str


NO_SOURCE = Refusal("no-source", "this node's own download of it has no source right now")
LOOP = Refusal("loop", "this node's own download of it comes from the asking node")


class DownloadFeed:
    """The handle one mirror response holds on its entry (a context manager: closed at the end)."""

    def __init__(self, table: OwnDownloads, digest: str, token: int) -> None:
        self._table, self._digest, self._token = table, digest, token

    def streaming(self, source: str, chain: tuple[str, ...] = ()) -> None:
        self._table._set(self._digest, self._token, Feed(source, chain))

    def searching(self) -> None:
        self._table._set(self._digest, self._token, Feed(None))

    def close(self) -> None:
        self._table._drop(self._digest, self._token)

    def __enter__(self) -> DownloadFeed:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class OwnDownloads:
    """Per digest, the sources of this node's downloads streaming through the mirror now."""

    def __init__(self) -> None:
        self._feeds: dict[str, dict[int, Feed]] = {}
        self._tokens = itertools.count()

    def open(self, digest: str) -> DownloadFeed:
        """A download of `digest` begins (no source yet)."""
        token = next(self._tokens)
        self._feeds.setdefault(digest, {})[token] = Feed(None)
        return DownloadFeed(self, digest, token)

    def refusal(self, digest: str, requester: str) -> Refusal | None:
        """Why this node must not serve its download of `digest` to `requester` (a host), or
        None when it may."""
        feeds = self._feeds.get(digest)
        if not feeds:
            return None
        for feed in feeds.values():
            if feed.source is None:
                return NO_SOURCE
            if requester in feed.hosts:
                return LOOP
        return None

    def fed_by(self, digest: str) -> tuple[str, ...]:
        """The hosts this node's bytes of `digest` come from (for the `Spegla-Fed-By` header)."""
        out: list[str] = []
        for feed in self._feeds.get(digest, {}).values():
            out.extend(h for h in feed.hosts if h not in out)
        return tuple(out[:MAX_CHAIN])

    def _set(self, digest: str, token: int, feed: Feed) -> None:
        feeds = self._feeds.get(digest)
        if feeds is not None and token in feeds:
            feeds[token] = feed

    def _drop(self, digest: str, token: int) -> None:
        feeds = self._feeds.get(digest)
        if feeds is None:
            return
        feeds.pop(token, None)
        if not feeds:
            del self._feeds[digest]
