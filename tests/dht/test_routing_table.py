"""k-buckets: long-lived contacts stay, the oldest is evicted only after a failed ping."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from dht.ids import Contact, distance, random_id_in_bucket
from dht.routing_table import RoutingTable

ME = bytes(32)


def contact_in_bucket(index: int, rng: random.Random, n: int = 0) -> Contact:
    return Contact(random_id_in_bucket(ME, index, rng), f"10.0.{n // 250}.{n % 250 + 1}", 5001)


def full_bucket(k: int = 4) -> tuple[RoutingTable, list[Contact], random.Random]:
    rng = random.Random(1)
    table = RoutingTable(ME, k=k)
    members = [contact_in_bucket(200, rng, i) for i in range(k)]
    for t, c in enumerate(members):
        assert table.seen(c, float(t)) is None
    return table, members, rng


def test_full_bucket_asks_to_ping_the_oldest_and_keeps_it_when_it_answers() -> None:
    table, members, rng = full_bucket()
    newcomer = contact_in_bucket(200, rng, 99)
    assert table.seen(newcomer, 400.0) == members[0]
    assert newcomer.node_id not in table
    # a second newcomer while the ping is outstanding does not ask again
    assert table.seen(contact_in_bucket(200, rng, 98), 401.0) is None
    table.seen(members[0], 402.0)  # the pong
    assert members[0].node_id in table
    assert newcomer.node_id not in table
    assert len(table) == 4


def test_oldest_is_evicted_only_after_the_ping_fails() -> None:
    table, members, rng = full_bucket()
    newcomer = contact_in_bucket(200, rng, 99)
    assert table.seen(newcomer, 400.0) == members[0]
    table.failed(members[0].node_id)  # the ping timed out
    assert members[0].node_id not in table
    assert newcomer.node_id in table
    assert len(table) == 4


def test_seen_again_moves_to_the_tail() -> None:
    table, members, rng = full_bucket()
    table.seen(members[0], 20.0)
    assert table.seen(contact_in_bucket(200, rng, 50), 400.0) == members[1]


def test_a_recently_seen_oldest_is_not_pinged() -> None:
    table, members, rng = full_bucket()
    newcomer = contact_in_bucket(200, rng, 99)
    assert table.seen(newcomer, 100.0) is None  # everyone was heard from < ping_after ago
    assert newcomer.node_id not in table
    table.failed(members[2].node_id)  # a failure frees a place: the newcomer takes it
    assert newcomer.node_id in table and len(table) == 4


def test_failures_without_replacement_drop_after_max_failures() -> None:
    table = RoutingTable(ME, k=4, max_failures=3)
    c = contact_in_bucket(10, random.Random(2))
    table.seen(c, 0.0)
    table.failed(c.node_id)
    table.failed(c.node_id)
    assert c.node_id in table
    table.failed(c.node_id)
    assert c.node_id not in table and len(table) == 0


def test_self_is_never_added() -> None:
    table = RoutingTable(ME)
    assert table.seen(Contact(ME, "10.0.0.1", 1), 0.0) is None
    assert len(table) == 0


@given(
    st.lists(st.binary(min_size=32, max_size=32), max_size=120),
    st.binary(min_size=32, max_size=32),
    st.integers(1, 30),
)
def test_closest_matches_brute_force(node_ids: list[bytes], target: bytes, count: int) -> None:
    table = RoutingTable(ME, k=8)
    for i, nid in enumerate(node_ids):
        table.seen(Contact(nid, "10.0.0.1", 1000 + i % 1000), float(i))
    held = [c.node_id for c in table.contacts()]
    assert len(held) == len(table) == len(set(held))
    expected = sorted(held, key=lambda n: distance(n, target))[:count]
    assert [c.node_id for c in table.closest(target, count)] == expected


def test_stale_buckets_start_at_the_nearest_non_empty_one() -> None:
    table = RoutingTable(ME)
    rng = random.Random(3)
    table.seen(contact_in_bucket(250, rng), 0.0)
    assert table.stale_buckets(1000.0, 900.0) == [250, 251, 252, 253, 254, 255]
    table.touch(random_id_in_bucket(ME, 252, rng), 999.0)
    assert 252 not in table.stale_buckets(1000.0, 900.0)


def test_seen_never_moves_a_known_id_relocate_does() -> None:
    table, members, rng = full_bucket()
    known = members[1]
    elsewhere = Contact(known.node_id, "10.9.9.9", 5001)
    assert table.seen(elsewhere, 500.0) is None
    assert table.get(known.node_id) == known  # the address a datagram claims changes nothing
    assert table.knows_at(known.node_id, known.addr)
    assert not table.knows_at(known.node_id, elsewhere.addr)
    assert table.relocate(elsewhere, 501.0)  # once the protocol core has proof
    assert table.get(known.node_id) == elsewhere
    waiting = contact_in_bucket(200, rng, 77)
    table.seen(waiting, 502.0)  # the bucket is full: it waits in the replacement cache
    assert waiting.node_id not in table and table.knows_at(waiting.node_id, waiting.addr)
    assert not table.relocate(waiting, 503.0)  # only table contacts move


def test_one_ip_holds_at_most_max_per_ip_contacts_except_loopback() -> None:
    rng = random.Random(4)
    table = RoutingTable(ME, k=20, max_per_ip=2)
    many = [Contact(rng.randbytes(32), "10.0.0.66", 5001 + i) for i in range(10)]
    for c in many:
        table.seen(c, 0.0)
    assert len(table) == 2 and table.refused_ip == 8
    assert not table.has_room(rng.randbytes(32), "10.0.0.66")
    table.seen(Contact(rng.randbytes(32), "10.0.0.2", 5001), 0.0)  # others are not refused
    assert len(table) == 3
    table.remove(many[0].node_id)  # a slot of that IP is free again
    table.seen(many[5], 1.0)
    assert many[5].node_id in table
    for i in range(5):  # test clusters on loopback share one IP
        table.seen(Contact(rng.randbytes(32), "127.0.0.1", 6000 + i), 0.0)
    assert len(table) == 8
