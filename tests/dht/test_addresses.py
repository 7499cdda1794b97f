"""A node with several addresses: the pure rules (which claimed addresses a record keeps, one wire
entry per address and grouped back), the version-3 ADD_PROVIDER on the wire (and the unchanged
forms without addresses), and the simulated network: a resolver learns every address of a
provider, also through nodes that only speak versions 1 and 2; replies listing several addresses
stay within the datagram bound (property)."""

from __future__ import annotations

import ipaddress
import random

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dht import codec
from dht.addresses import (
    MAX_MORE_HOSTS,
    PlainContacts,
    each_address,
    group_by_node,
    kept_more_hosts,
)
from dht.codec import AddProvider, DecodeError, Providers
from dht.effects import Effect
from dht.ids import ProviderInfo, RecordState, key_id, random_node_id
from dht.protocol import DhtProtocol, ProtocolConfig
from dht.simulation import SimNetwork, SimNode

PSK = b"cluster key for the tests, 32 b"
KEY = "sha256:" + "cd" * 32
A = b"\x0a" * 32
B = b"\x0b" * 32


def test_a_record_keeps_only_usable_other_addresses() -> None:
    claimed = ["fd00::5", "10.0.0.1", "0.0.0.0", "::", "224.0.0.1", "127.0.0.1", "nonsense"]
    assert kept_more_hosts([*claimed, "fd00::5"], "10.0.0.1") == ("fd00::5",)
    assert kept_more_hosts(["127.0.0.2"], "127.0.0.1") == ("127.0.0.2",)  # a loopback cluster
    many = [f"10.1.0.{i}" for i in range(1, 10)]
    assert kept_more_hosts(many, "10.0.0.1") == tuple(many[:MAX_MORE_HOSTS])
    assert kept_more_hosts(["FD00:0::5"], "10.0.0.1") == ("fd00::5",)  # one spelling


def test_one_entry_per_address_and_grouped_back() -> None:
    record = ProviderInfo(A, "10.0.0.1", 5000, RecordState.INFLIGHT, ("fd00::1", "10.0.1.1"))
    plain = ProviderInfo(B, "10.0.0.2", 5000)
    entries = each_address([record, plain])
    assert [(e.node_id, e.host, e.more_hosts) for e in entries] == [
        (A, "10.0.0.1", ()),
        (A, "fd00::1", ()),
        (A, "10.0.1.1", ()),
        (B, "10.0.0.2", ()),
    ]
    assert all(e.state is RecordState.INFLIGHT for e in entries[:3])
    assert group_by_node(entries) == (record, plain)
    # a later entry of the same node with another port or state does not join it
    odd = ProviderInfo(A, "10.9.9.9", 6000, RecordState.INFLIGHT)
    assert group_by_node([*entries, odd]) == (record, plain)


def test_plain_contacts_are_remembered_for_a_while_and_bounded() -> None:
    plain = PlainContacts(hold=10.0, max_nodes=2)
    plain.add(A, 0.0)
    assert plain(A, 9.0) and not plain(B, 9.0)
    assert not plain(A, 10.0)
    for i in range(3):
        plain.add(bytes([i]) * 32, 0.0)
    assert not plain(bytes([0]) * 32, 1.0) and plain(bytes([2]) * 32, 1.0)


def test_add_provider_names_other_addresses_in_version_3_only() -> None:
    with_hosts = AddProvider(7, A, B, 5000, 600, b"tok", RecordState.COMPLETE, ("fd00::1",))
    data = codec.encode(with_hosts)
    assert msgpack.unpackb(data)[0] == codec.VERSION_ADDRESSES
    assert codec.decode(data) == with_hosts
    # without other addresses the forms are those of versions 1 and 2, as before
    plain = AddProvider(7, A, B, 5000, 600, b"tok")
    assert msgpack.unpackb(codec.encode(plain))[0] == codec.VERSION
    inflight = AddProvider(7, A, B, 5000, 60, b"tok", RecordState.INFLIGHT)
    assert msgpack.unpackb(codec.encode(inflight))[0] == codec.VERSION_STATES
    assert codec.decode(codec.encode(inflight)) == inflight


def test_bad_version_3_datagrams_are_refused() -> None:
    good = msgpack.unpackb(codec.encode(AddProvider(7, A, B, 5000, 600, b"", more_hosts=("::1",))))
    too_many = [*good[:-1], [codec.pack_ip("10.0.0.1")] * (MAX_MORE_HOSTS + 1)]
    not_ips = [*good[:-1], [b"abc"]]
    not_a_list = [*good[:-1], b"\x0a\x00\x00\x01"]
    ping_v3 = [codec.VERSION_ADDRESSES, codec.Kind.PING, 1, A]
    for fields in (too_many, not_ips, not_a_list, ping_v3, good[:-1]):
        with pytest.raises(DecodeError):
            codec.decode(msgpack.packb(fields))


def test_a_providers_reply_lists_a_record_once_per_address() -> None:
    record = ProviderInfo(A, "10.0.0.1", 5000, more_hosts=("fd00::1",))
    reply = Providers(1, B, b"", (record,), False, ())
    decoded = codec.decode(codec.encode(reply))
    assert isinstance(decoded, Providers)
    # what a version-1 node reads: two entries of one node (its lookup keeps the first)
    assert [(p.node_id, p.host) for p in decoded.providers] == [(A, "10.0.0.1"), (A, "fd00::1")]
    assert not decoded.more
    assert group_by_node(decoded.providers) == (record,)


def test_config_checks_other_addresses() -> None:
    with pytest.raises(ValueError):
        ProtocolConfig(node_id=A, registry_port=5000, more_hosts=("not-an-ip",))
    with pytest.raises(ValueError):
        ProtocolConfig(node_id=A, registry_port=5000, more_hosts=("10.0.0.1",) * 5)
    for unpackable in ("fe80::1%eth0", "FD00::1"):  # a zone; not the canonical spelling
        with pytest.raises(ValueError):
            ProtocolConfig(node_id=A, registry_port=5000, more_hosts=(unpackable,))


class _OldProtocol(DhtProtocol):
    """A node that only speaks versions 1 and 2: it drops version-3 datagrams as bad."""

    def handle_datagram(self, data: bytes, addr: tuple[str, int], now: float) -> list[Effect]:
        if msgpack.unpackb(codec.unseal(data, self.config.psk))[0] == codec.VERSION_ADDRESSES:
            self.dropped_v3 = getattr(self, "dropped_v3", 0) + 1
            return []
        return super().handle_datagram(data, addr, now)


def _network(
    old_share: float, psk: bytes | None = PSK
) -> tuple[SimNetwork, list[SimNode], SimNode]:
    """Other addresses are kept only from authenticated senders: the cluster key is on unless
    `psk` is None."""
    rng = random.Random(1005)
    multi = random_node_id(rng)
    net = SimNetwork(
        seed=5,
        config=lambda nid: ProtocolConfig(
            node_id=nid,
            registry_port=5000,
            more_hosts=("fd00::7",) if nid == multi else (),
            psk=psk,
        ),
    )
    nodes = net.grow(40)
    for node in nodes[: int(len(nodes) * old_share)]:
        node.protocol.__class__ = _OldProtocol
    provider = net.add_node(multi)
    net.bootstrap(provider, [nodes[-1].addr, nodes[-2].addr])
    net.run_for(2.0)
    return net, nodes, provider


@pytest.mark.parametrize("old_share", [0.0, 0.5])
def test_a_resolver_learns_every_address_of_a_provider(old_share: float) -> None:
    net, nodes, provider = _network(old_share)
    net.advertise(provider, [KEY])
    net.run_for(3.0)
    holders = [n for n in nodes if n.protocol.store.get(key_id(KEY), net.now)]
    assert len(holders) >= 20  # k records, old nodes included (they got the plain form)
    for holder in holders:
        (record,) = holder.protocol.store.get(key_id(KEY), net.now)
        assert record.host == provider.addr[0]
        old = isinstance(holder.protocol, _OldProtocol)
        assert record.more_hosts == (() if old else ("fd00::7",))
    if old_share:
        assert any(isinstance(h.protocol, _OldProtocol) for h in holders)
    seeker = next(n for n in nodes[::-1] if not isinstance(n.protocol, _OldProtocol))
    result = net.resolve(seeker, KEY)
    net.run_for(1.0)
    (found,) = result.providers
    assert found.host == provider.addr[0]
    if not old_share:
        assert found.hosts == (provider.addr[0], "fd00::7")
    else:  # the first record heard of wins: an old holder's has the source address only
        assert found.hosts in ((provider.addr[0], "fd00::7"), (provider.addr[0],))


def test_without_the_key_other_addresses_are_not_kept() -> None:
    """Unauthenticated, a record names only the address its datagram came from."""
    net, nodes, provider = _network(0.0, psk=None)
    net.advertise(provider, [KEY])
    net.run_for(3.0)
    records = [r for n in nodes for r in n.protocol.store.get(key_id(KEY), net.now)]
    assert len(records) >= 20
    assert all(r.host == provider.addr[0] and r.more_hosts == () for r in records)


def test_the_provider_itself_lists_its_other_addresses() -> None:
    """Two nodes: the resolver can only ask the provider itself, which answers with the record it
    keeps of itself (the 'at the address this reply came from' entry, then its other address)."""
    rng = random.Random(1009)
    multi = random_node_id(rng)
    net = SimNetwork(
        seed=9,
        config=lambda nid: ProtocolConfig(
            node_id=nid,
            registry_port=5000,
            more_hosts=("fd00::7",) if nid == multi else (),
            psk=PSK,
        ),
    )
    seeker = net.add_node()
    provider = net.add_node(multi)
    net.bootstrap(seeker, [])
    net.bootstrap(provider, [seeker.addr])
    net.run_for(2.0)
    net.advertise(provider, [KEY])
    net.run_for(2.0)
    (own,) = provider.protocol.store.get(key_id(KEY), net.now)
    assert own.host == "0.0.0.0" and own.more_hosts == ("fd00::7",)
    seeker.protocol.store = type(seeker.protocol.store)()  # only the provider can answer
    result = net.resolve(seeker, KEY)
    net.run_for(1.0)
    assert [p.hosts for p in result.providers] == [(provider.addr[0], "fd00::7")]


_hosts = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)
_multi = st.builds(
    ProviderInfo,
    st.binary(min_size=32, max_size=32),
    _hosts,
    st.integers(1, 65535),
    st.sampled_from(list(RecordState)),
    st.lists(_hosts, max_size=MAX_MORE_HOSTS, unique_by=ipaddress.ip_address).map(tuple),
).filter(lambda p: p.host not in p.more_hosts)  # a record never repeats its source address


@given(st.lists(_multi, max_size=40, unique_by=lambda p: p.node_id))
def test_replies_with_several_addresses_stay_bounded_and_group_back(
    records: list[ProviderInfo],
) -> None:
    reply = Providers(codec.MAX_TXID, A, b"t" * codec.TOKEN_MAX, tuple(records), False, ())
    data = codec.encode(reply)
    assert len(data) <= codec.MAX_PAYLOAD
    decoded = codec.decode(data)
    assert isinstance(decoded, Providers)
    grouped = group_by_node(decoded.providers)
    # every record that fit comes back whole, in order (as addresses: inet_ntop may spell one
    # otherwise); one cut by the size bound keeps its first addresses; `more` says so
    assert len(grouped) <= len(records)
    for got, sent in zip(grouped, records, strict=False):
        assert got.node_id == sent.node_id
        assert _ips(got.hosts) == _ips(sent.hosts)[: len(got.hosts)]
    assert decoded.more == (len(decoded.providers) < len(each_address(records)))


def _ips(hosts: tuple[str, ...]) -> list[object]:
    return [ipaddress.ip_address(h) for h in hosts]
