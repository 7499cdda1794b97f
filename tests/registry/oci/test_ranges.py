"""Range parsing and arithmetic, including property tests against slicing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry.oci.ranges import ByteRange, RangeError, RangeNotSatisfiable, parse_range


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-9", 100, (0, 9)),
        ("bytes=10-", 100, (10, 99)),
        ("bytes=-5", 100, (95, 99)),
        ("bytes=-500", 100, (0, 99)),
        ("bytes=90-500", 100, (90, 99)),
        ("bytes=99-99", 100, (99, 99)),
        ("bytes=0-0", 1, (0, 0)),
        (" bytes=1-2 ", 10, (1, 2)),
    ],
)
def test_resolve(header: str, size: int, expected: tuple[int, int]) -> None:
    r = parse_range(header).resolve(size)
    assert (r.start, r.end) == expected
    assert r.content_range == f"bytes {expected[0]}-{expected[1]}/{size}"
    assert r.length == expected[1] - expected[0] + 1


@pytest.mark.parametrize(
    ("header", "size"),
    [("bytes=100-", 100), ("bytes=100-200", 100), ("bytes=0-", 0), ("bytes=-1", 0)],
)
def test_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header).resolve(size)


@pytest.mark.parametrize(
    "header",
    [
        "",
        "bytes",
        "bytes=",
        "bytes=-",
        "items=0-1",
        "bytes=0-1,3-4",
        "bytes=5-4",
        "bytes=a-b",
        "bytes=-0",
        "bytes=1-2-3",
        "bytes=" + "9" * 20 + "-",
        "bytes=+1-2",
        "bytes=0x1-2",
    ],
)
def test_malformed(header: str) -> None:
    with pytest.raises(RangeError):
        parse_range(header)


def test_byte_range_helpers() -> None:
    r = ByteRange(0, 9, 10)
    assert r.is_full and r.header == "bytes=0-9"
    assert not ByteRange(1, 9, 10).is_full


@given(st.integers(0, 300), st.integers(0, 300), st.integers(1, 300))
def test_matches_python_slicing(first: int, last: int, size: int) -> None:
    data = bytes(range(256)) * 2
    data = data[:size]
    if last < first:
        with pytest.raises(RangeError):
            parse_range(f"bytes={first}-{last}")
        return
    spec = parse_range(f"bytes={first}-{last}")
    if first >= size:
        with pytest.raises(RangeNotSatisfiable):
            spec.resolve(size)
        return
    r = spec.resolve(size)
    assert data[r.start : r.end + 1] == data[first : last + 1]


@given(st.integers(1, 400), st.integers(1, 300))
def test_suffix_matches_slicing(n: int, size: int) -> None:
    data = (bytes(range(256)) * 2)[:size]
    r = parse_range(f"bytes=-{n}").resolve(size)
    assert data[r.start : r.end + 1] == data[-n:]


@given(st.text(max_size=40))
def test_never_crashes(header: str) -> None:
    try:
        parse_range(header).resolve(100)
    except (RangeError, RangeNotSatisfiable):
        pass
