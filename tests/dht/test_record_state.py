"""Record states (complete | inflight | claim) through the protocol core on the in-memory network:
what a resolver sees, switching state, short ttls, a withdraw that reaches the holders at once."""

from __future__ import annotations

from dht.ids import RecordState, key_id
from dht.protocol import ProtocolConfig
from dht.simulation import SimNetwork, SimNode

KEY = "sha256:" + "cd" * 32
PSK = b"record states are for keyed nodes"


def network(n: int, seed: int = 3) -> tuple[SimNetwork, list[SimNode]]:
    """Keyed nodes: without the key a node keeps in-flight and claim records only from senders
    its table already held (docs/security/dht.md), so the first announce may miss a few."""
    net = SimNetwork(
        seed=seed, config=lambda nid: ProtocolConfig(node_id=nid, registry_port=5000, psk=PSK)
    )
    nodes = net.grow(n)
    net.run_for(2.0)
    return net, nodes


def remote_records(net: SimNetwork, key: str, provider: SimNode) -> list[RecordState]:
    """The states of `provider`'s record of `key` held by other nodes."""
    kid = key_id(key)
    out = []
    for node in net.nodes.values():
        if node is provider:
            continue
        for p in node.protocol.store.get(kid, net.now):
            if p.node_id == provider.protocol.node_id:
                out.append(p.state)
    return out


def test_resolver_sees_the_state_and_its_upgrade() -> None:
    net, nodes = network(50)
    provider, seeker = nodes[4], nodes[30]
    net.advertise(provider, [KEY], RecordState.INFLIGHT)
    net.run_for(1.0)
    states = remote_records(net, KEY, provider)
    assert len(states) == 20 and set(states) == {RecordState.INFLIGHT}
    result = net.resolve(seeker, KEY)
    net.run_for(1.0)
    assert [(p.node_id, p.state) for p in result.providers] == [
        (provider.protocol.node_id, RecordState.INFLIGHT)
    ]
    net.advertise(provider, [KEY], RecordState.COMPLETE)  # committed: re-announced at once
    net.run_for(1.0)
    assert set(remote_records(net, KEY, provider)) == {RecordState.COMPLETE}
    result = net.resolve(seeker, KEY)
    net.run_for(1.0)
    assert [p.state for p in result.providers] == [RecordState.COMPLETE]


def test_withdrawing_an_inflight_record_drops_it_everywhere_at_once() -> None:
    net, nodes = network(50)
    provider = nodes[9]
    net.advertise(provider, [KEY], RecordState.INFLIGHT)
    net.run_for(1.0)
    assert len(remote_records(net, KEY, provider)) == 20
    net.withdraw(provider, [KEY])
    net.run_for(0.1)  # one round trip, far below any ttl
    assert remote_records(net, KEY, provider) == []
    assert provider.protocol.statistics().keys_advertised == 0


def test_inflight_and_claim_records_lapse_soon_after_their_node_dies() -> None:
    net, nodes = network(50)
    inflight, claimant = nodes[5], nodes[6]
    cfg = inflight.protocol.config
    net.advertise(inflight, [KEY], RecordState.INFLIGHT)
    net.advertise(claimant, [KEY], RecordState.CLAIM)
    net.run_for(3 * cfg.inflight_refresh)  # refreshed meanwhile: still there
    assert set(remote_records(net, KEY, inflight)) == {RecordState.INFLIGHT}
    assert set(remote_records(net, KEY, claimant)) == {RecordState.CLAIM}
    net.kill(claimant)
    net.run_for(cfg.claim_ttl + 1.0)
    assert remote_records(net, KEY, claimant) == []
    assert remote_records(net, KEY, inflight)  # its owner still refreshes it
    net.kill(inflight)
    net.run_for(cfg.inflight_ttl + 1.0)
    assert remote_records(net, KEY, inflight) == []


def test_complete_records_keep_their_long_ttl() -> None:
    net, nodes = network(40)
    provider = nodes[2]
    net.advertise(provider, [KEY])
    net.run_for(1.0)
    net.kill(provider)
    net.run_for(provider.protocol.config.inflight_ttl + 5.0)
    assert len(remote_records(net, KEY, provider)) == 20
