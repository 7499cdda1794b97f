"""The protocol core driven through the in-memory network: announcing, resolving, tokens, expiry,
withdraw, pacing and convergence under loss and node death."""

from __future__ import annotations

import random

import pytest

from dht import codec
from dht.codec import AddProvider, Ping, Pong
from dht.effects import Send
from dht.ids import key_id, random_node_id
from dht.protocol import PONG_SIZE, DhtProtocol, ProtocolConfig
from dht.simulation import SimNetwork, SimNode

KEY = "sha256:" + "ab" * 32


def network(n: int, seed: int = 1, loss: float = 0.0) -> tuple[SimNetwork, list[SimNode]]:
    net = SimNetwork(seed=seed, loss=loss)
    nodes = net.grow(n)
    net.run_for(2.0)
    return net, nodes


def holders(net: SimNetwork, key: str, now: float | None = None) -> list[SimNode]:
    at = net.now if now is None else now
    return [n for n in net.nodes.values() if n.protocol.store.get(key_id(key), at)]


def test_announce_reaches_the_k_closest_and_resolve_finds_the_provider() -> None:
    net, nodes = network(60)
    provider, seeker = nodes[5], nodes[40]
    net.advertise(provider, [KEY])
    net.run_for(1.0)
    assert len(holders(net, KEY)) == 20 + 1  # k remote records plus our own
    result = net.resolve(seeker, KEY)
    net.run_for(1.0)
    assert [p.node_id for p in result.providers] == [provider.protocol.node_id]
    # the record's IP is the address the announcement came from, the port the registry port
    assert (result.providers[0].host, result.providers[0].port) == (provider.addr[0], 5000)
    assert result.stats is not None and result.stats.converged


def test_a_miss_converges_without_waiting_out_a_timeout() -> None:
    net, nodes = network(60)
    result = net.resolve(nodes[3], "sha256:" + "00" * 32)
    net.run_for(1.0)
    assert result.providers == [] and result.stats is not None and result.stats.converged
    assert result.done_at is not None
    cfg = nodes[3].protocol.config
    assert result.done_at - result.started < cfg.rpc_stall  # no RPC even stalled
    assert result.stats.rpcs < 40


def test_resolve_never_returns_the_node_itself() -> None:
    net, nodes = network(30)
    net.advertise(nodes[0], [KEY])
    net.advertise(nodes[1], [KEY])
    net.run_for(1.0)
    result = net.resolve(nodes[0], KEY)
    net.run_for(1.0)
    assert [p.node_id for p in result.providers] == [nodes[1].protocol.node_id]


def test_records_are_refreshed_and_expire_after_withdraw() -> None:
    net, nodes = network(40)
    provider = nodes[7]
    net.advertise(provider, [KEY])
    net.run_for(2000.0)  # several refresh periods (540 s) and more than a ttl (600 s)
    assert len(holders(net, KEY)) >= 20
    provider.protocol.withdraw([KEY], 0.0)
    assert provider.protocol.store.get(key_id(KEY), net.now) == []
    net.run_for(700.0)
    assert holders(net, KEY) == []
    assert all(len(n.protocol.store) == 0 for n in nodes)


def test_add_provider_needs_a_token_from_the_source_address() -> None:
    node = DhtProtocol(ProtocolConfig(node_id=b"\x01" * 32, registry_port=5000))
    src = ("10.0.0.9", 5001)
    kid = key_id(KEY)
    forged = AddProvider(1, b"\x02" * 32, kid, 5000, 600, b"12345678")
    node.handle_datagram(codec.encode(forged), src, 0.0)
    assert node.statistics().tokens_refused == 1 and len(node.store) == 0
    # a token handed to another IP does not work either
    other_token = node.tokens.issue("10.0.0.10", 0.0)
    node.handle_datagram(
        codec.encode(AddProvider(2, b"\x02" * 32, kid, 5000, 600, other_token)), src, 0.0
    )
    assert len(node.store) == 0
    # a ping padded to the size of a pong with a token (what an unproven requester sends)
    ping = codec.padded(Ping(3, b"\x02" * 32), PONG_SIZE)
    sent = node.handle_datagram(codec.encode(ping), src, 0.0)
    replies = [codec.decode(e.data) for e in sent if isinstance(e, Send)]
    [pong] = [m for m in replies if isinstance(m, Pong)]
    token = pong.token
    add = AddProvider(4, b"\x02" * 32, kid, 5000, 600, token)
    effects = node.handle_datagram(codec.encode(add), src, 1.0)
    ack = codec.decode(effects[-1].data)  # type: ignore[union-attr]
    assert isinstance(ack, codec.Ack) and ack.stored
    [record] = node.store.get(kid, 1.0)
    assert (record.host, record.port) == ("10.0.0.9", 5000)
    assert node.store.get(kid, 601.5) == []  # the ttl applies to the record


def test_thousands_of_keys_are_announced_paced_not_in_one_burst() -> None:
    net, nodes = network(40)
    keys = [f"sha256:{i:064x}" for i in range(1000)]
    effects = nodes[0].protocol.advertise(keys, net.now)
    sends = [e for e in effects if isinstance(e, Send)]
    cfg = nodes[0].protocol.config
    assert len(sends) <= cfg.announce_concurrency * cfg.alpha
    assert nodes[0].protocol.statistics().announces_queued == 1000 - cfg.announce_concurrency
    net.apply(nodes[0], effects)
    net.run_for(1.0)
    # at most the burst plus one second's rate have started
    started = 1000 - nodes[0].protocol.statistics().announces_queued
    assert started <= cfg.announce_burst + cfg.announce_rate + 1
    net.run_for(60.0)
    assert nodes[0].protocol.statistics().announces_queued == 0
    assert len(holders(net, keys[567])) >= 20


def test_a_flood_from_one_source_is_rate_limited() -> None:
    cfg = ProtocolConfig(node_id=b"\x01" * 32, registry_port=5000, rate=100, burst=50)
    node = DhtProtocol(cfg)
    replies = 0
    for i in range(5000):
        ping = codec.encode(codec.padded(Ping(i, b"\x02" * 32), PONG_SIZE))
        replies += len(node.handle_datagram(ping, ("10.0.0.66", 5001), i * 0.0001))
    assert replies <= 50 + 100 * 0.5 + 1
    assert node.statistics().rate_limited >= 4800
    other = codec.padded(Ping(1, b"\x03" * 32), PONG_SIZE)
    assert node.handle_datagram(codec.encode(other), ("10.0.0.67", 5001), 0.5)


@pytest.mark.parametrize("loss", [0.1, 0.3])
def test_lookups_converge_under_loss(loss: float) -> None:
    net, nodes = network(150, seed=4)
    net.loss = loss
    rng = random.Random(9)
    results = []
    for i in range(20):
        key = f"sha256:{i:064x}"
        net.advertise(rng.choice(nodes), [key])
        net.run_for(2.0)
        results.append(net.resolve(rng.choice(nodes), key))
        net.run_for(2.0)
    assert all(r.stats is not None and r.stats.converged for r in results)
    assert sum(bool(r.providers) for r in results) >= 19


def test_dead_contacts_are_replaced_not_waited_for() -> None:
    net, nodes = network(200, seed=5)
    net.advertise(nodes[0], [KEY])
    net.run_for(1.0)
    rng = random.Random(2)
    for node in rng.sample(nodes[1:], 60):
        net.kill(node)
    seekers = [n for n in nodes[1:] if n.alive][:20]
    results = [net.resolve(s, KEY) for s in seekers]
    net.run_for(2.0)
    assert all(r.providers for r in results)
    # dead contacts cost a soft deadline each (10 ms), never the 500 ms RPC timeout
    assert all(
        r.first_provider_at is not None and r.first_provider_at - r.started < 0.1 for r in results
    )


def test_bootstrap_alone_and_against_nobody() -> None:
    net = SimNetwork()
    node = net.add_node()
    job = net.bootstrap(node, [])
    net.run_for(0.1)
    assert job in node.bootstraps_done
    job = net.bootstrap(node, [("10.99.0.1", 5001)])  # nobody there: a few pings, then give up
    net.run_for(0.9)
    assert job not in node.bootstraps_done
    net.run_for(1.0)
    assert job in node.bootstraps_done and len(node.protocol.table) == 0


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        ProtocolConfig(node_id=b"short", registry_port=5000)
    with pytest.raises(ValueError):
        ProtocolConfig(node_id=random_node_id(random.Random(1)), registry_port=5000, refresh=700)


def test_idle_nodes_refresh_their_buckets_and_drop_dead_contacts() -> None:
    net, nodes = network(30, seed=8)
    dead = nodes[5]
    net.kill(dead)
    knew = sum(dead.protocol.node_id in n.protocol.table for n in nodes)
    before = [n.protocol.statistics().rpcs_sent for n in nodes]
    net.run_for(2000.0)  # no lookups at all: only maintenance runs
    after = [n.protocol.statistics().rpcs_sent for n in nodes]
    alive = [i for i, n in enumerate(nodes) if n.alive]
    assert all(after[i] > before[i] for i in alive)
    # refresh lookups ran into the dead node, and most tables have already forgotten it
    # (a contact goes after repeated failures, or at once when a replacement is waiting)
    still = sum(dead.protocol.node_id in nodes[i].protocol.table for i in alive)
    assert still < knew / 2


def _announce_cost(monkeypatch: pytest.MonkeyPatch | None) -> tuple[int, SimNetwork, list[str]]:
    if monkeypatch is not None:  # without reusing tokens: FIND_NODE first, then ADD_PROVIDER
        monkeypatch.setattr(DhtProtocol, "_fresh_token", lambda self, contact, now: b"")
    net, nodes = network(80, seed=12)
    keys = [f"sha256:{i:064x}" for i in range(150)]
    before = nodes[3].protocol.statistics().rpcs_sent
    net.advertise(nodes[3], keys)
    net.run_for(30.0)
    return nodes[3].protocol.statistics().rpcs_sent - before, net, keys


def test_fresh_tokens_let_an_add_provider_double_as_the_lookup_query(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reusing, net, keys = _announce_cost(None)
    assert all(len(holders(net, key)) >= 20 for key in keys)
    assert all(n.protocol.statistics().tokens_refused == 0 for n in net.nodes.values())
    plain, _, _ = _announce_cost(monkeypatch)
    assert reusing < 0.75 * plain


def test_a_stale_cached_token_is_refused_then_replaced() -> None:
    net, nodes = network(40, seed=13)
    announcer = nodes[2].protocol
    for contact in announcer.table.contacts():
        announcer._their_tokens[contact.addr] = (b"stale!!!", net.now)
    net.advertise(nodes[2], [KEY])
    net.run_for(5.0)
    assert sum(n.protocol.statistics().tokens_refused for n in nodes) > 0
    assert len(holders(net, KEY)) >= 20  # refused ADDs were retried with the fresh tokens
