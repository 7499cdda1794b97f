"""The XOR metric and bucket arithmetic."""

from __future__ import annotations

import hashlib
import random

from hypothesis import given
from hypothesis import strategies as st

from dht.ids import ID_BYTES, bucket_index, distance, key_id, random_id_in_bucket

ids = st.binary(min_size=ID_BYTES, max_size=ID_BYTES)


def test_key_id_is_sha256_of_the_utf8_key() -> None:
    assert key_id("foobar") == hashlib.sha256(b"foobar").digest()
    # Spegel's test vector for "foobar" is a CIDv1 over this same multihash digest
    assert key_id("foobar").hex().startswith("c3ab8ff1")


@given(ids, ids, ids)
def test_xor_is_a_metric(a: bytes, b: bytes, c: bytes) -> None:
    assert distance(a, a) == 0
    assert distance(a, b) == distance(b, a)
    assert (distance(a, b) == 0) == (a == b)
    assert distance(a, c) <= distance(a, b) + distance(b, c)
    assert distance(a, b) ^ distance(b, c) == distance(a, c)


@given(ids, ids, ids)
def test_xor_is_unidirectional(a: bytes, b: bytes, c: bytes) -> None:
    # for any point and distance there is exactly one point at that distance
    if b != c:
        assert distance(a, b) != distance(a, c)


@given(ids, st.integers(min_value=0, max_value=255), st.integers())
def test_random_id_lands_in_the_requested_bucket(me: bytes, index: int, seed: int) -> None:
    other = random_id_in_bucket(me, index, random.Random(seed))
    assert bucket_index(me, other) == index
    assert 2**index <= distance(me, other) < 2 ** (index + 1)


def test_bucket_of_self_is_minus_one() -> None:
    me = bytes(32)
    assert bucket_index(me, me) == -1
    assert bucket_index(me, bytes(31) + b"\x01") == 0
    assert bucket_index(me, b"\x80" + bytes(31)) == 255
