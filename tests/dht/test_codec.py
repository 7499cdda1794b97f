"""The wire codec: round trips, size limits, and that any byte string is either a message or a
DecodeError."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dht import codec
from dht.codec import (
    Ack,
    AddProvider,
    DecodeError,
    FindNode,
    GetProviders,
    Nodes,
    Ping,
    Pong,
    Providers,
)
from dht.ids import Contact, ProviderInfo, RecordState
from dht.protocol import DhtProtocol, ProtocolConfig

ids = st.binary(min_size=32, max_size=32)
txids = st.integers(min_value=0, max_value=codec.MAX_TXID)
tokens = st.binary(max_size=codec.TOKEN_MAX)
ports = st.integers(min_value=1, max_value=65535)
hosts = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)
contacts = st.builds(Contact, ids, hosts, ports)
states = st.sampled_from(list(RecordState))
providers = st.builds(ProviderInfo, ids, hosts, ports, states)

messages = st.one_of(
    st.builds(Ping, txids, ids),
    st.builds(Pong, txids, ids, tokens),
    st.builds(FindNode, txids, ids, ids),
    st.builds(Nodes, txids, ids, tokens, st.lists(contacts, max_size=8).map(tuple)),
    st.builds(GetProviders, txids, ids, ids, st.integers(0, 1000)),
    st.builds(
        Providers,
        txids,
        ids,
        tokens,
        st.lists(providers, max_size=5).map(tuple),
        st.booleans(),
        st.lists(contacts, max_size=5).map(tuple),
    ),
    st.builds(AddProvider, txids, ids, ids, ports, st.integers(1, codec.MAX_TTL), tokens),
    st.builds(AddProvider, txids, ids, ids, ports, st.integers(0, codec.MAX_TTL), tokens, states),
    st.builds(Ack, txids, ids, st.booleans(), tokens, st.lists(contacts, max_size=5).map(tuple)),
)


def _canonical(c: Contact) -> Contact:
    return Contact(c.node_id, codec.unpack_ip(codec.pack_ip(c.host)), c.port)


@given(messages)
def test_round_trip(msg: codec.Message) -> None:
    decoded = codec.decode(codec.encode(msg))
    assert type(decoded) is type(msg)
    assert decoded.txid == msg.txid and decoded.sender == msg.sender
    if isinstance(msg, Nodes | Ack):
        assert isinstance(decoded, Nodes | Ack)
        assert decoded.nodes == tuple(_canonical(c) for c in msg.nodes)
    elif not isinstance(msg, Providers):
        assert decoded == msg


@given(st.lists(contacts, min_size=0, max_size=60), st.lists(providers, max_size=60), tokens)
def test_replies_stay_under_the_size_limit(
    cs: list[Contact], ps: list[ProviderInfo], token: bytes
) -> None:
    nodes = codec.encode(Nodes(codec.MAX_TXID, bytes(32), token, tuple(cs)))
    assert len(nodes) <= codec.MAX_PAYLOAD
    reply = Providers(codec.MAX_TXID, bytes(32), token, tuple(ps), False, tuple(cs))
    data = codec.encode(reply)
    assert len(data) <= codec.MAX_PAYLOAD
    decoded = codec.decode(data)
    assert isinstance(decoded, Providers)
    # a trimmed provider list says so
    assert decoded.more == (len(decoded.providers) < len(ps))


def test_twenty_ipv4_contacts_fit_in_one_reply() -> None:
    cs = tuple(Contact(bytes([i]) * 32, f"10.0.0.{i}", 5001) for i in range(20))
    decoded = codec.decode(codec.encode(Nodes(1, bytes(32), b"t" * 8, cs)))
    assert isinstance(decoded, Nodes) and decoded.nodes == cs


@pytest.mark.parametrize(
    "obj",
    [
        [3, 1, 1, bytes(32)],  # unknown version
        [1, 7, 1, bytes(32), bytes(32), 5000, 0, b"t"],  # ttl 0 (a withdraw) needs version 2
        [1, 7, 1, bytes(32), bytes(32), 5000, 60, b"t", 1],  # a state needs version 2
        [2, 7, 1, bytes(32), bytes(32), 5000, 60, b"t"],  # version 2 ADD_PROVIDER has a state
        [2, 7, 1, bytes(32), bytes(32), 5000, 60, b"t", 3],  # unknown state
        [2, 7, 1, bytes(32), bytes(32), 5000, 60, b"t", True],  # bool is not a state
        [2, 6, 1, bytes(32), b"", [[bytes(32), b"\x7f\x00\x00\x01", 5000]], False, []],  # no state
        [1, 6, 1, bytes(32), b"", [[bytes(32), b"\x7f\x00\x00\x01", 5000, 1]], False, []],
        [2, 6, 1, bytes(32), b"", [[bytes(32), b"\x7f\x00\x00\x01", 5000, -1]], False, []],
        [1, 99, 1, bytes(32)],  # unknown kind
        [1, 1, -1, bytes(32)],  # negative txid
        [1, 1, 1, bytes(31)],  # short id
        [1, 1, 1, bytes(32), "extra"],  # wrong arity
        [1, 3, 1, bytes(32), "not-an-id"],
        [1, 7, 1, bytes(32), bytes(32), 0, 600, b"t"],  # port 0
        [1, 7, 1, bytes(32), bytes(32), 5000, 600, b"t" * 33],  # token too long
        [1, 4, 1, bytes(32), b"", [[bytes(32), b"\x01\x02\x03", 5001]]],  # 3-byte ip
        [1, 4, 1, bytes(32), b"", [[bytes(32), b"\x7f\x00\x00\x01"]]],  # short entry
        [1, 8, 1, bytes(32), 1, b"", []],  # int where a bool belongs
        [True, 1, 1, bytes(32)],
        {"a": 1},
        [1, 4, 1, bytes(32), b"", list(range(1000))],  # huge array
    ],
)
def test_invalid_messages_are_refused(obj: object) -> None:
    with pytest.raises(DecodeError):
        codec.decode(msgpack.packb(obj))


@settings(max_examples=500)
@given(st.binary(max_size=2000))
def test_any_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    try:
        codec.decode(data)
    except DecodeError:
        pass


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=40)
    | st.text(max_size=10)
    | st.floats(),
    lambda inner: (
        st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=500)
@given(st.integers(0, 9), st.integers(0, 9), msgpack_values, st.lists(msgpack_values, max_size=6))
def test_structured_garbage_is_refused_or_valid(
    version: int, kind: int, txid: object, rest: list[object]
) -> None:
    data = msgpack.packb([version, kind, txid, bytes(32), *rest])
    try:
        msg = codec.decode(data)
    except DecodeError:
        return
    assert codec.decode(codec.encode(msg)).txid == msg.txid


@settings(max_examples=300)
@given(st.binary(max_size=1600))
def test_the_core_counts_and_drops_garbage(data: bytes) -> None:
    proto = DhtProtocol(ProtocolConfig(node_id=b"\x01" * 32, registry_port=5000))
    effects = proto.handle_datagram(data, ("127.0.0.1", 4000), 0.0)
    stats = proto.statistics()
    assert stats.bad_datagrams + stats.rpcs_received + stats.unexpected_replies == 1
    if stats.bad_datagrams:
        assert effects == []


def test_hmac_framing() -> None:
    payload = codec.encode(Ping(7, bytes(32)))
    sealed = codec.seal(payload, b"secret")
    assert codec.unseal(sealed, b"secret") == payload
    with pytest.raises(DecodeError):
        codec.unseal(sealed, b"other")
    with pytest.raises(DecodeError):
        codec.unseal(payload, b"secret")
    with pytest.raises(DecodeError):
        codec.unseal(sealed[:-1] + bytes([sealed[-1] ^ 1]), b"secret")
    with pytest.raises(DecodeError):
        codec.unseal(b"x" * (codec.MAX_DATAGRAM + 1), None)


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(messages, st.sampled_from(["10.0.0.1", "10.0.0.2", "::1"]), st.floats(0, 5)),
        max_size=40,
    )
)
def test_the_core_survives_any_sequence_of_valid_messages(
    inputs: list[tuple[codec.Message, str, float]],
) -> None:
    proto = DhtProtocol(ProtocolConfig(node_id=b"\x01" * 32, registry_port=5000))
    proto.advertise(["sha256:" + "aa" * 32], 0.0)
    now = 0.0
    for msg, host, step in inputs:
        now += step
        proto.handle_datagram(codec.encode(msg), (host, 5001), now)
        proto.handle_timeouts(now)
    proto.handle_timeouts(now + 3600.0)
    stats = proto.statistics()
    assert stats.bad_datagrams == 0  # all were well-formed
    assert stats.table_size <= len(inputs)
    assert stats.records_held <= len(inputs) + 1


def test_messages_without_states_stay_version_1() -> None:
    """Nodes that only speak version 1 keep understanding complete records."""
    plain = Providers(1, bytes(32), b"t", (ProviderInfo(bytes(32), "10.0.0.1", 5000),), False, ())
    assert msgpack.unpackb(codec.encode(plain))[0] == codec.VERSION
    add = AddProvider(1, bytes(32), bytes(32), 5000, 600, b"t")
    assert msgpack.unpackb(codec.encode(add))[0] == codec.VERSION


def test_states_travel_in_version_2() -> None:
    inflight = ProviderInfo(bytes([1]) * 32, "10.0.0.1", 5000, RecordState.INFLIGHT)
    complete = ProviderInfo(bytes([2]) * 32, "10.0.0.2", 5000)
    data = codec.encode(Providers(1, bytes(32), b"t", (inflight, complete), False, ()))
    assert msgpack.unpackb(data)[0] == codec.VERSION_STATES
    decoded = codec.decode(data)
    assert isinstance(decoded, Providers)
    assert [p.state for p in decoded.providers] == [RecordState.INFLIGHT, RecordState.COMPLETE]
    claim = AddProvider(2, bytes(32), bytes(32), 5000, 15, b"t", RecordState.CLAIM)
    assert codec.decode(codec.encode(claim)) == claim
    drop = AddProvider(3, bytes(32), bytes(32), 5000, 0, b"t")
    assert msgpack.unpackb(codec.encode(drop))[0] == codec.VERSION_STATES
    assert codec.decode(codec.encode(drop)) == drop


def test_twenty_stateful_providers_still_fit_with_the_size_budget() -> None:
    ps = tuple(
        ProviderInfo(bytes([i]) * 32, f"10.0.0.{i}", 5000, RecordState.INFLIGHT) for i in range(40)
    )
    data = codec.encode(Providers(1, bytes(32), b"t" * 8, ps, False, ()))
    assert len(data) <= codec.MAX_PAYLOAD
    decoded = codec.decode(data)
    assert isinstance(decoded, Providers) and decoded.more
    assert decoded.providers == ps[: len(decoded.providers)] and len(decoded.providers) >= 20
