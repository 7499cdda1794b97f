"""HTTP `Range` for blobs: parsing one `bytes=` range and resolving it against a size.

Why pure: range arithmetic is where off-by-one bugs live; it is tested exhaustively without I/O
and shared by local serving, mirroring (client ranges) and resuming (ranges sent to peers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["ByteRange", "RangeError", "RangeNotSatisfiable", "RangeSpec", "parse_range"]

_RANGE_RE = re.compile(r"bytes=([0-9]*)-([0-9]*)")
_MAX_DIGITS = 19  # keeps every value below 2**63


class RangeError(ValueError):
    """A malformed or unsupported `Range` header (not `bytes=`, several ranges, bad numbers)."""


class RangeNotSatisfiable(ValueError):
    """A well-formed range that selects no byte of the content (416)."""

    def __init__(self, size: int) -> None:
        super().__init__(f"range not satisfiable for content of {size} bytes")
        self.size = size


@dataclass(frozen=True, slots=True)
class ByteRange:
    """An inclusive byte range within content of `size` bytes."""

    start: int
    end: int
    size: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    @property
    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end}/{self.size}"

    @property
    def header(self) -> str:
        """This range as a request `Range` header value."""
        return f"bytes={self.start}-{self.end}"

    @property
    def is_full(self) -> bool:
        return self.start == 0 and self.end == self.size - 1


@dataclass(frozen=True, slots=True)
class RangeSpec:
    """`a-b` (first=a, last=b), `a-` (last=None) or suffix `-n` (first=None, last=n)."""

    first: int | None
    last: int | None

    def resolve(self, size: int) -> ByteRange:
        """The bytes this spec selects in content of `size` bytes; RangeNotSatisfiable if none."""
        if size <= 0:
            raise RangeNotSatisfiable(size)
        if self.first is None:
            assert self.last is not None
            count = min(self.last, size)
            return ByteRange(size - count, size - 1, size)
        if self.first >= size:
            raise RangeNotSatisfiable(size)
        end = size - 1 if self.last is None else min(self.last, size - 1)
        return ByteRange(self.first, end, size)


def parse_range(header: str) -> RangeSpec:
    """Parse a `Range` header holding exactly one `bytes=` range; RangeError otherwise."""
    text = header.strip()
    if not text.startswith("bytes="):
        raise RangeError(f"unsupported range unit in {header[:80]!r} (only bytes=)")
    if "," in text:
        raise RangeError("multiple ranges are not supported")
    match = _RANGE_RE.fullmatch(text.replace(" ", ""))
    if match is None:
        raise RangeError(f"malformed range {header[:80]!r}")
    first_text, last_text = match.groups()
    if len(first_text) > _MAX_DIGITS or len(last_text) > _MAX_DIGITS:
        raise RangeError("range value too large")
    if not first_text:
        if not last_text:
            raise RangeError("range needs a start or a suffix length")
        suffix = int(last_text)
        if suffix == 0:
            raise RangeError("suffix range of zero bytes")
        return RangeSpec(None, suffix)
    first = int(first_text)
    last = int(last_text) if last_text else None
    if last is not None and last < first:
        raise RangeError(f"range end {last} before start {first}")
    return RangeSpec(first, last)
