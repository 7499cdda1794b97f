"""The protocol core's trust rules, without I/O (docs/security/dht.md): a node id is not bound to an
address by one datagram; records sit in their source's slot with capped ttls and per-source
quotas; claims only from proven senders; no reply larger than an unproven request; nonces and
secrets from the OS."""

from __future__ import annotations

import os
import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dht import codec
from dht.codec import Ack, AddProvider, FindNode, GetProviders, Message, Ping, Pong, Providers
from dht.effects import Effect, ProvidersFound, Send
from dht.ids import Contact, ProviderInfo, RecordState, key_id
from dht.protocol import PONG_SIZE, TTL_SLACK, DhtProtocol, ProtocolConfig
from dht.providers import ProviderStore
from dht.simulation import SimNetwork

ME = b"\x01" * 32
HONEST = b"\x80" + b"\x02" * 31
HONEST_ADDR = ("10.0.0.2", 5001)
ROGUE_ADDR = ("10.0.0.66", 5001)
PSK = b"cluster key for the trust tests!"
KEY = "sha256:" + "ef" * 32
KID = key_id(KEY)


def node(psk: bytes | None = None, seed: int = 7) -> DhtProtocol:
    cfg = ProtocolConfig(node_id=ME, registry_port=5000, psk=psk)
    p = DhtProtocol(cfg, random.Random(seed))
    p.table.seen(Contact(HONEST, *HONEST_ADDR), 0.0)  # proven earlier (it answered us)
    return p


def sent(effects: list[Effect], psk: bytes | None = None) -> list[tuple[tuple[str, int], Message]]:
    return [
        (e.addr, codec.decode(codec.unseal(e.data, psk))) for e in effects if isinstance(e, Send)
    ]


def token_for(p: DhtProtocol, addr: tuple[str, int], now: float = 0.0) -> bytes:
    """What a party at `addr` gets by asking: the node's write token for its IP."""
    ping = codec.padded(Ping(99, b"\x55" * 32), PONG_SIZE)
    out = sent(p.handle_datagram(codec.encode(ping), addr, now))
    [pong] = [m for a, m in out if a == addr and isinstance(m, Pong)]
    assert pong.token
    return pong.token


def request(p: DhtProtocol, msg: Message, addr: tuple[str, int], now: float = 0.0) -> list[Effect]:
    return p.handle_datagram(codec.seal(codec.encode(msg), p.config.psk), addr, now)


# -- a contact's address ---------------------------------------------------------------------------


def test_an_unproven_ping_with_a_known_id_changes_nothing() -> None:
    p = node()
    effects = request(p, codec.padded(Ping(5, HONEST), PONG_SIZE), ROGUE_ADDR)
    assert p.table.get(HONEST) == Contact(HONEST, *HONEST_ADDR)
    assert not any(a == HONEST_ADDR for a, _ in sent(effects))  # no check started either
    assert len(p.relocations) == 0


def test_a_move_is_checked_and_refused_while_the_old_address_answers() -> None:
    p = node()
    token = token_for(p, ROGUE_ADDR)  # the rogue proves its own address ...
    effects = request(p, Ping(5, HONEST, token), ROGUE_ADDR)  # ... and claims the honest id
    assert p.table.get(HONEST) == Contact(HONEST, *HONEST_ADDR)
    pings = {a: m for a, m in sent(effects) if isinstance(m, Ping)}
    assert set(pings) == {HONEST_ADDR, ROGUE_ADDR}  # a nonce to each address
    # the rogue echoes its nonce; the honest node answers at its old address: no move
    p.handle_datagram(codec.encode(Pong(pings[ROGUE_ADDR].txid, HONEST, b"")), ROGUE_ADDR, 0.1)
    p.handle_datagram(codec.encode(Pong(pings[HONEST_ADDR].txid, HONEST, b"")), HONEST_ADDR, 0.1)
    p.handle_timeouts(5.0)
    assert p.table.get(HONEST) == Contact(HONEST, *HONEST_ADDR)
    assert p.statistics().moves_refused == 1


def test_a_pong_that_does_not_echo_the_nonce_moves_nothing() -> None:
    p = node()
    token = token_for(p, ROGUE_ADDR)
    request(p, Ping(5, HONEST, token), ROGUE_ADDR)
    for guess in range(50):  # wrong nonces; the honest node has gone quiet
        p.handle_datagram(codec.encode(Pong(guess, HONEST, b"")), ROGUE_ADDR, 0.1)
    p.handle_timeouts(5.0)
    assert p.table.get(HONEST) == Contact(HONEST, *HONEST_ADDR)
    assert p.statistics().unexpected_replies == 50


def test_a_node_that_really_moved_is_followed() -> None:
    """The old address is silent and the new one echoes its nonce: the contact moves."""
    p = node()
    new = ("10.0.0.3", 5001)
    token = token_for(p, new)
    effects = request(p, FindNode(6, HONEST, ME, token), new)
    [nonce] = [m.txid for a, m in sent(effects) if a == new and isinstance(m, Ping)]
    p.handle_datagram(codec.encode(Pong(nonce, HONEST, b"")), new, 0.1)
    assert p.table.get(HONEST) == Contact(HONEST, *HONEST_ADDR)  # not yet: the old may answer
    p.handle_timeouts(5.0)
    assert p.table.get(HONEST) == Contact(HONEST, *new)


def test_with_the_key_an_authenticated_datagram_is_proof() -> None:
    p = node(PSK)
    new = ("10.0.0.3", 5001)
    request(p, Ping(5, HONEST), new)
    assert p.table.get(HONEST) == Contact(HONEST, *new)
    # and without the key nothing is accepted at all
    forged = codec.encode(Ping(6, HONEST))
    p.handle_datagram(forged, ROGUE_ADDR, 1.0)
    assert p.table.get(HONEST) == Contact(HONEST, *new)
    assert p.statistics().bad_datagrams == 1


def test_unproven_requesters_enter_the_table_only_after_echoing_a_nonce() -> None:
    p = node()
    newcomer = b"\x40" + b"\x09" * 31
    effects = request(p, codec.padded(FindNode(8, newcomer, ME), 1200), ROGUE_ADDR)
    assert p.table.get(newcomer) is None
    [nonce] = [m.txid for a, m in sent(effects) if isinstance(m, Ping)]
    p.handle_datagram(codec.encode(Pong(nonce, newcomer, b"")), ROGUE_ADDR, 0.1)
    assert p.table.get(newcomer) == Contact(newcomer, *ROGUE_ADDR)


# -- provider records ------------------------------------------------------------------------------


def add(
    p: DhtProtocol,
    addr: tuple[str, int],
    sender: bytes,
    ttl: int = 600,
    state: RecordState = RecordState.COMPLETE,
    port: int = 5000,
) -> bool:
    token = token_for(p, addr)
    msg = AddProvider(11, sender, KID, port, ttl, token, state)
    [ack] = [m for a, m in sent(request(p, msg, addr)) if isinstance(m, Ack)]
    return ack.stored


def test_another_nodes_id_neither_overwrites_nor_deletes_its_record() -> None:
    p = node()
    assert add(p, HONEST_ADDR, HONEST)
    assert add(p, ROGUE_ADDR, HONEST, port=6666)  # it may name only itself ...
    assert add(p, ROGUE_ADDR, HONEST, ttl=0, state=RecordState.COMPLETE)  # ... and drop only that
    assert p.store.get(KID, 1.0) == [ProviderInfo(HONEST, HONEST_ADDR[0], 5000)]
    assert add(p, HONEST_ADDR, HONEST, ttl=0)  # the honest node withdraws its own
    assert p.store.get(KID, 1.0) == []


def test_ttls_are_capped_near_the_advertising_ttl() -> None:
    p = node()
    assert add(p, HONEST_ADDR, HONEST, ttl=codec.MAX_TTL)
    cap = TTL_SLACK * p.config.ttl
    assert p.store.get(KID, cap - 1.0) != [] and p.store.get(KID, cap + 0.1) == []
    p2 = node(seed=8)
    p2.table.seen(Contact(HONEST, *HONEST_ADDR), 0.0)
    assert add(p2, HONEST_ADDR, HONEST, ttl=3600, state=RecordState.CLAIM)
    assert p2.store.get(KID, TTL_SLACK * p2.config.claim_ttl + 0.1) == []


def test_claims_only_from_a_proven_sender() -> None:
    p = node()
    assert not add(p, ROGUE_ADDR, b"\x77" * 32, state=RecordState.CLAIM)  # unknown sender
    assert not add(p, ROGUE_ADDR, HONEST, state=RecordState.INFLIGHT)  # not where HONEST is
    assert p.statistics().claims_refused == 2 and p.store.get(KID, 1.0) == []
    assert add(p, HONEST_ADDR, HONEST, state=RecordState.CLAIM)  # the table proves this one
    keyed = node(PSK)
    token = keyed.tokens.issue(ROGUE_ADDR[0], 0.0)
    claim = AddProvider(12, b"\x77" * 32, KID, 5000, 15, token, RecordState.CLAIM)
    [ack] = [m for _, m in sent(request(keyed, claim, ROGUE_ADDR), PSK) if isinstance(m, Ack)]
    assert ack.stored  # an agent holding the key is trusted


def test_one_source_cannot_fill_the_store() -> None:
    store = ProviderStore(max_per_source=50, max_claims_per_source=5)
    for i in range(80):
        store.add(i.to_bytes(32, "big"), ProviderInfo(b"\x66" * 32, "10.0.0.66", 1), 1e9)
    assert store.source_records("10.0.0.66") == 50 and store.refused_quota == 30
    assert store.add(KID, ProviderInfo(HONEST, "10.0.0.2", 5000), 1e9)  # others are not refused
    claims = [
        store.add(KID, ProviderInfo(b"\x67" * 32, "10.0.0.67", p, RecordState.CLAIM), 1e9)
        for p in range(4)
    ]
    assert claims == [True, True, True, True]
    # one IP holds at most max_per_key_source (4) records of a key, whatever its ports
    assert not store.add(KID, ProviderInfo(b"\x67" * 32, "10.0.0.67", 9, RecordState.CLAIM), 1e9)
    claim = ProviderInfo(b"\x67" * 32, "10.0.0.67", 1, RecordState.CLAIM)
    taken = [store.add(i.to_bytes(32, "big"), claim, 1e9) for i in range(10)]
    assert taken == [True] + [False] * 9  # the claim quota (5) holds across keys
    # removing records gives the quota back
    for i in range(80):
        store.remove(i.to_bytes(32, "big"), ("10.0.0.66", 1))
    assert store.source_records("10.0.0.66") == 0
    assert store.add(b"\xaa" * 32, ProviderInfo(b"\x66" * 32, "10.0.0.66", 1), 1e9)


# -- what a resolver dials ---------------------------------------------------------------------


def test_a_resolver_never_reports_link_local_metadata_or_foreign_loopback() -> None:
    p = node()
    _, effects = p.start_resolve(KEY, 0.0)
    [(addr, query)] = [(a, m) for a, m in sent(effects) if isinstance(m, GetProviders)]
    assert addr == HONEST_ADDR
    bad = ("169.254.169.254", "fe80::1", "127.0.0.1", "224.0.0.1", "fd00:ec2::254")
    entries = tuple(ProviderInfo(bytes([i + 2]) * 32, h, 5000) for i, h in enumerate(bad))
    good = ProviderInfo(b"\x20" * 32, "10.0.0.20", 5000)
    twin = ProviderInfo(b"\x20" * 32, "10.0.0.21", 5000)  # same id elsewhere: its own provider
    reply = Providers(query.txid, HONEST, b"", (*entries, good, twin), False, ())
    out = p.handle_datagram(codec.encode(reply), HONEST_ADDR, 0.01)
    found = [pr for e in out if isinstance(e, ProvidersFound) for pr in e.providers]
    assert found == [good, twin]


# -- amplification -------------------------------------------------------------------------------

_ids = st.binary(min_size=32, max_size=32)
_requests = st.one_of(
    st.builds(Ping, st.integers(0, codec.MAX_TXID), _ids),
    st.builds(FindNode, st.integers(0, codec.MAX_TXID), _ids, _ids),
    st.builds(GetProviders, st.integers(0, codec.MAX_TXID), _ids, st.just(KID), st.just(0)),
    st.builds(
        AddProvider,
        st.integers(0, codec.MAX_TXID),
        _ids,
        st.just(KID),
        st.integers(1, 65535),
        st.integers(1, 3600),
        st.binary(max_size=8),
    ),
    st.builds(
        FindNode, st.integers(0, codec.MAX_TXID), _ids, _ids, st.binary(min_size=1, max_size=40)
    ),
)


def _crowded() -> DhtProtocol:
    p = node()
    rng = random.Random(3)
    for i in range(300):
        p.table.seen(Contact(rng.randbytes(32), f"10.1.{i // 250}.{i % 250}", 5001), 0.0)
    for i in range(40):
        p.store.add(KID, ProviderInfo(rng.randbytes(32), f"10.2.0.{i}", 5000), 1e9)
    return p


_CROWDED = _crowded()


@settings(max_examples=300, deadline=None)
@given(_requests)
def test_no_reply_to_an_unproven_source_is_larger_than_its_request(msg: Message) -> None:
    data = codec.encode(msg)
    effects = _CROWDED.handle_datagram(data, ROGUE_ADDR, 1.0)
    for e in effects:
        if isinstance(e, Send) and e.addr == ROGUE_ADDR:
            assert len(e.data) <= len(data), (msg, len(e.data), len(data))


def test_a_padded_or_tokened_request_gets_the_full_answer() -> None:
    p = _crowded()
    plain = FindNode(1, b"\x33" * 32, KID)
    [(_, small)] = [(a, m) for a, m in sent(request(p, plain, ROGUE_ADDR)) if a == ROGUE_ADDR]
    assert isinstance(small, codec.Nodes) and small.nodes == ()  # 76 bytes buy no contacts
    full = codec.padded(plain, codec.MAX_PAYLOAD)
    [(_, big)] = [
        (a, m)
        for a, m in sent(request(p, full, ROGUE_ADDR))
        if a == ROGUE_ADDR and isinstance(m, codec.Nodes)
    ]
    assert isinstance(big, codec.Nodes) and len(big.nodes) == p.config.k
    tokened = FindNode(2, b"\x33" * 32, KID, big.token)
    [(_, also)] = [
        (a, m)
        for a, m in sent(request(p, tokened, ROGUE_ADDR))
        if a == ROGUE_ADDR and isinstance(m, codec.Nodes)
    ]
    assert isinstance(also, codec.Nodes) and len(also.nodes) == p.config.k
    assert p.statistics().replies_trimmed == 1  # the plain one only


# -- randomness ----------------------------------------------------------------------------------


def test_secrets_and_nonces_come_from_the_os_unless_an_rng_is_injected() -> None:
    cfg = ProtocolConfig(node_id=ME, registry_port=5000)
    a, b = DhtProtocol(cfg), DhtProtocol(cfg)
    assert a._random_bytes is os.urandom
    assert a.tokens.issue("10.0.0.1", 0.0) != b.tokens.issue("10.0.0.1", 0.0)
    # a seeded rng (simulation, tests) makes both the same: determinism is the caller's choice
    c, d = DhtProtocol(cfg, random.Random(1)), DhtProtocol(cfg, random.Random(1))
    assert c.tokens.issue("10.0.0.1", 0.0) == d.tokens.issue("10.0.0.1", 0.0)
    assert c._txid() == d._txid()


@pytest.mark.parametrize("kind", [Ping, FindNode, GetProviders])
def test_version_4_proof_round_trips(kind: type) -> None:
    args = {Ping: (1, ME), FindNode: (1, ME, KID), GetProviders: (1, ME, KID, 0)}[kind]
    msg = kind(*args, b"t" * 8)
    assert codec.decode(codec.encode(msg)) == msg
    assert msgpack.unpackb(codec.encode(msg))[0] == codec.VERSION_PROOF


def test_without_the_key_inflight_records_reach_every_holder_by_the_first_refresh() -> None:
    """An honest node a holder has not heard from yet is refused once (no claim from an id the
    holder did not know at that address); the holder then knows it, and the refresh is kept."""
    net = SimNetwork(seed=3)
    nodes = net.grow(50)
    net.run_for(2.0)
    provider = nodes[4]

    def holders() -> int:
        return sum(
            any(r.node_id == provider.protocol.node_id for r in n.protocol.store.get(KID, net.now))
            for n in net.nodes.values()
            if n is not provider
        )

    net.advertise(provider, [KEY], RecordState.INFLIGHT)
    net.run_for(1.0)
    first = holders()
    assert first >= 15
    net.run_for(provider.protocol.config.inflight_refresh + 1.0)
    assert holders() == provider.protocol.config.k
