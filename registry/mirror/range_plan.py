"""Several peers for one blob: which byte ranges go to which peer, and in what order they go on.

Why pure: on real networks a provider's uplink, not the requester's downlink, limits a big blob
from one peer; fetching ranges from several at once multiplies that.  The decisions (cut the blob
into pieces, hand the lowest free piece inside the reorder window to an idle peer, let a stream
that just finished a piece go on with the next one, take a stalled head piece away from its slow
peer, remember who sent which bytes) are kept here without I/O or clock so they can be tested
exhaustively; `registry.mirror.multi_peer` is the Trio driver.

Terms: the *head* is the first piece not yet passed on in full; only pieces in
[head, head + window) are fetched, so the bytes held in memory never exceed window x piece_size
whatever the blob's size.  A piece is *owned* by at most one peer at a time; bytes arrive in order
from its start (`filled`), and a piece taken over by another peer continues where it stopped.
Each contiguous run of bytes from one peer is a *span*: when the blob does not match its digest,
the span that does not fit is found by comparing prefix digests at span ends (`Span.end`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Piece", "RangePlan", "Span"]

PeerKey = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Span:
    """Bytes [start, end) of the blob came from `peer`."""

    peer: PeerKey
    start: int
    end: int


@dataclass(slots=True)
class Piece:
    index: int
    start: int
    end: int  # exclusive
    filled: int = 0  # bytes received, in order from `start`
    owner: PeerKey | None = None
    avoid: set[PeerKey] = field(default_factory=set)  # peers too slow for this piece
    spans: list[Span] = field(default_factory=list)
    since: float = 0.0  # when the owner last made progress (or took it)

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def offset(self) -> int:
        """The next byte this piece needs."""
        return self.start + self.filled

    @property
    def complete(self) -> bool:
        return self.filled == self.length


class RangePlan:
    """The pieces of one blob and who fetches which (see the module docstring)."""

    def __init__(self, size: int, piece_size: int, window: int) -> None:
        if size <= 0 or piece_size <= 0 or window < 1:
            raise ValueError("a range plan needs a size, a piece size and a window of at least 1")
        self.size = size
        self.window = window
        self.pieces = [
            Piece(index, start, min(start + piece_size, size))
            for index, start in enumerate(range(0, size, piece_size))
        ]
        self.head = 0

    @property
    def done(self) -> bool:
        return self.head >= len(self.pieces)

    def _in_window(self) -> list[Piece]:
        return self.pieces[self.head : self.head + self.window]

    def assign(self, peer: PeerKey, now: float) -> Piece | None:
        """The lowest piece in the window nobody is fetching that `peer` may fetch (now owned by
        it), or None when there is nothing for it now."""
        for piece in self._in_window():
            if piece.owner is None and not piece.complete and peer not in piece.avoid:
                piece.owner, piece.since = peer, now
                return piece
        return None

    def go_on(self, peer: PeerKey, finished: Piece, now: float) -> Piece | None:
        """After `peer` finished `finished` on a stream that continues past its end: the next
        piece if that stream can carry on with it (free, untouched, in the window)."""
        index = finished.index + 1
        if index >= len(self.pieces) or index >= self.head + self.window:
            return None
        piece = self.pieces[index]
        if piece.owner is not None or piece.filled or peer in piece.avoid:
            return None
        piece.owner, piece.since = peer, now
        return piece

    def received(self, piece: Piece, peer: PeerKey, count: int, now: float) -> None:
        """`count` more bytes of `piece` arrived from its owner `peer`."""
        if piece.owner != peer or count <= 0 or piece.filled + count > piece.length:
            raise ValueError("bytes from a peer that does not own this piece, or too many")
        start = piece.offset
        last = piece.spans[-1] if piece.spans else None
        if last is not None and last.peer == peer and last.end == start:
            piece.spans[-1] = Span(peer, last.start, start + count)
        else:
            piece.spans.append(Span(peer, start, start + count))
        piece.filled += count
        piece.since = now
        if piece.complete:
            piece.owner = None

    def stopped(self, piece: Piece, peer: PeerKey, *, slow: bool = False) -> None:
        """`peer` stopped fetching `piece` (failed, or cancelled); another may continue it.  A
        peer stopped for being slow is not given this piece again."""
        if piece.owner == peer:
            piece.owner = None
        if slow:
            piece.avoid.add(peer)

    def stalled_head(self, now: float, slow_after: float) -> Piece | None:
        """The head piece, if its owner has sent nothing for `slow_after` (take it away)."""
        if self.done:
            return None
        piece = self.pieces[self.head]
        if piece.owner is not None and now - piece.since >= slow_after:
            return piece
        return None

    def passed_on(self, piece: Piece) -> None:
        """The head piece went out in full: the window moves on."""
        if piece.index != self.head or not piece.complete:
            raise ValueError("only the complete head piece can be passed on")
        self.head += 1

    def spans(self) -> list[Span]:
        """Every span of the blob, in order (complete once the plan is done)."""
        result: list[Span] = []
        for piece in self.pieces:
            for span in piece.spans:
                if result and result[-1].peer == span.peer and result[-1].end == span.start:
                    result[-1] = Span(span.peer, result[-1].start, span.end)
                else:
                    result.append(span)
        return result

    def idle_work(self, peer: PeerKey) -> bool:
        """True when `peer` could be given a piece now (used to decide whether to wait)."""
        return any(
            piece.owner is None and not piece.complete and peer not in piece.avoid
            for piece in self._in_window()
        )
