"""Adversarial DHT suite on real containerd in namespaces (issue 17, items 3 and 9; see
docs/security/dht.md).

A hostile party on the cluster network (a raw UDP socket in the harness's upstream namespace: a
host that is not a node, like a pod with its own IP) speaks the DHT protocol by hand against the
agents as the base install runs them:

- id spoofing: it claims an honest node's id (PINGs with a token of its own, echoing every nonce,
  ADD_PROVIDERs in that id, a ttl-0 withdrawal); the honest contact and records stay as they were
  and pulls are still served by peers;
- record and claim flooding: thousands of records from one source, and claims for every blob of
  an image nobody holds yet with ids ground to out-rank the honest nodes; pulls are served, none
  waits for a planted claim.

Each case asserts what the attacker sent and that it gained nothing, and prints one
`ATTACK <case>: <outcome>` line (run with -s to see them).  Bounded in datagrams and in time.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.node.setup import read_cluster_key
from dht import codec
from dht.codec import Ack, AddProvider, GetProviders, Message, Ping, Pong, Providers
from dht.ids import RecordState, key_id
from dht.protocol import PONG_SIZE
from registry.burst.claim import claim_rank
from tests.e2e.shared import (
    Pull,
    assert_intact,
    cluster_with_agents,
    counter,
    upstream_blobs,
    wait_served_by_peer,
)
from tests.harness import agents as ag
from tests.harness import nsexec
from tests.harness.cluster import Cluster, Node
from tests.harness.images import BuiltImage, build_small
from tests.harness.netns import UPSTREAM_IP

pytestmark = [pytest.mark.root, pytest.mark.slow]

ROGUE_REGISTRY_PORT = 6666  # nothing listens there: a peer that dials it fails at once
FLOOD = 3000  # records per target in the flood case (the DHT's rate limit is 2000/s per IP)


# the observer's key per cluster (None: the agents run without one)
_OBSERVER_KEYS: dict[int, bytes | None] = {}


@pytest.fixture(scope="module", params=["keyless", "keyed"])
def c(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """The base install's agents: without the cluster key (what the DHT must withstand on its
    own) and with it (the default install, the Secret created)."""
    extra = ["--cluster-key-file="] if request.param == "keyless" else []
    with cluster_with_agents("spg-adv-", nodes=3, large_mib=1, extra=extra) as cl:
        key_file = ag.cluster_key_file(cl)
        _OBSERVER_KEYS[id(cl)] = read_cluster_key(str(key_file)) if not extra else None
        try:
            yield cl
        finally:
            _OBSERVER_KEYS.pop(id(cl), None)


def fresh_image(c: Cluster, tmp_path: Path, what: str) -> tuple[BuiltImage, str]:
    tag = hashlib.sha256(str(tmp_path).encode()).hexdigest()[:8]
    img = build_small(tmp_path / "img", name=f"adv-{what}-{tag}")
    return img, c.upstream.push(img)


def report(case: str, outcome: str) -> None:
    print(f"ATTACK {case}: {outcome}")


def debug_stats(node: Node) -> dict[str, Any]:
    url = f"http://127.0.0.1:{ag.METRICS_PORT}/debug/web/stats"
    status, _, body = node.http_get(url, timeout=5.0)
    assert status == 200, status
    return json.loads(body)  # type: ignore[no-any-return]


def node_id(node: Node) -> bytes:
    url = f"http://127.0.0.1:{ag.METRICS_PORT}/debug/web/metadata"
    status, _, body = node.http_get(url, timeout=5.0)
    assert status == 200, status
    return bytes.fromhex(json.loads(body)["node"]["id"])


def contact_of(node: Node, peer_id: bytes) -> tuple[str, int] | None:
    for p in debug_stats(node)["peers"]:
        if str(p.get("node_id", p.get("id", ""))) == peer_id.hex():
            return (str(p["host"]), int(p["port"]))
    return None


def dht_stat(node: Node, name: str) -> int:
    return int(debug_stats(node)["stats"]["dht"].get(name, 0))


# -- the attacker (runs in the upstream namespace, plain sockets) ---------------------------------


class Rogue:
    """One UDP socket speaking the DHT wire format by hand, counting what it sends.  The
    attacker never holds the cluster key; the test's own observer does (`key`) if the agents
    run with one."""

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("0.0.0.0", 0))
        self.sent: Counter[str] = Counter()
        self.echoed = 0
        self.txid = 1

    def close(self) -> None:
        self.sock.close()

    def send(self, msg: Message, to: tuple[str, int]) -> None:
        self.sock.sendto(codec.seal(codec.encode(msg), self.key), to)
        self.sent[type(msg).__name__] += 1

    def next_txid(self) -> int:
        self.txid += 1
        return self.txid

    def drain(self, seconds: float, echo_as: bytes | None = None) -> list[Message]:
        """What arrives for `seconds`; every PING (a nonce) is answered in `echo_as`'s name."""
        out: list[Message] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data, addr = self.sock.recvfrom(2048)
            except OSError:
                break
            try:
                msg = codec.decode(codec.unseal(data, self.key))
            except codec.DecodeError:
                continue  # sealed with a key we do not hold
            if isinstance(msg, Ping) and echo_as is not None:
                self.send(Pong(msg.txid, echo_as, b""), addr)
                self.echoed += 1
            out.append(msg)
        return out

    def token(self, target: tuple[str, int], as_id: bytes) -> bytes:
        """The target's write token for our own IP (what any host gets by asking; a bare
        version-1 ping too, for agents that predate version 4)."""
        self.send(codec.padded(Ping(self.next_txid(), as_id), PONG_SIZE), target)
        self.send(Ping(self.next_txid(), as_id), target)
        pongs = [m for m in self.drain(0.5) if isinstance(m, Pong) and m.token]
        return pongs[0].token if pongs else b""

    def providers(self, target: tuple[str, int], key: str) -> list[tuple[str, str, int, int]]:
        ask = GetProviders(self.next_txid(), os.urandom(32), key_id(key), 0)
        self.send(codec.padded(ask, codec.MAX_PAYLOAD), target)
        found = [m for m in self.drain(0.5) if isinstance(m, Providers)]
        if not found:  # an agent that predates version 4
            self.send(GetProviders(self.next_txid(), os.urandom(32), key_id(key), 0), target)
            found = [m for m in self.drain(0.5) if isinstance(m, Providers)]
        return [(p.node_id.hex(), p.host, p.port, p.state) for m in found for p in m.providers]


def spoof(targets: list[tuple[str, int]], honest: bytes, keys: list[str]) -> dict[str, Any]:
    """Claim `honest`'s id at every target: pings with a token, echo every nonce, records in its
    name and ttl-0 withdrawals of its records.  Returns what was sent and what was echoed."""
    rogue = Rogue()
    try:
        stored = 0
        for target in targets:
            token = rogue.token(target, honest)
            rogue.send(Ping(rogue.next_txid(), honest, token), target)
            rogue.send(Ping(rogue.next_txid(), honest), target)  # and in version 1
            rogue.drain(1.5, echo_as=honest)  # the move check: answer its nonce as `honest`
            for key in keys:
                for ttl in (codec.MAX_TTL, 0):
                    add = AddProvider(
                        rogue.next_txid(), honest, key_id(key), ROGUE_REGISTRY_PORT, ttl, token
                    )
                    rogue.send(add, target)
            acks = [m for m in rogue.drain(0.5, echo_as=honest) if isinstance(m, Ack)]
            stored += sum(a.stored for a in acks)
        rogue.drain(1.5, echo_as=honest)  # any late nonce
        return {"sent": dict(rogue.sent), "echoed": rogue.echoed, "stored": stored}
    finally:
        rogue.close()


def flood(targets: list[tuple[str, int]], claims: dict[str, bytes], records: int) -> dict[str, Any]:
    """From one source: `records` complete records of random keys per target, then a claim for
    each key of `claims` in the name of the id given for it.  Returns what was sent."""
    rogue = Rogue()
    try:
        acked: Counter[bool] = Counter()
        for target in targets:
            token = rogue.token(target, os.urandom(32))
            for i in range(records):
                add = AddProvider(
                    rogue.next_txid(), os.urandom(32), os.urandom(32), ROGUE_REGISTRY_PORT,
                    codec.MAX_TTL, token,
                )  # fmt: skip
                rogue.send(add, target)
                if i % 200 == 199:
                    time.sleep(0.1)  # stay near the per-source rate limit instead of far over
            for key, claimer in claims.items():
                add = AddProvider(
                    rogue.next_txid(), claimer, key_id(key), ROGUE_REGISTRY_PORT, 60, token,
                    RecordState.CLAIM,
                )  # fmt: skip
                rogue.send(add, target)
            acked.update(a.stored for a in rogue.drain(1.0) if isinstance(a, Ack))
        return {"sent": dict(rogue.sent), "stored": acked[True], "refused": acked[False]}
    finally:
        rogue.close()


def _providers(
    target: tuple[str, int], key: str, psk: bytes | None
) -> list[tuple[str, str, int, int]]:
    rogue = Rogue(psk)
    try:
        return rogue.providers(target, key)
    finally:
        rogue.close()


def providers_at(c: Cluster, target: tuple[str, int], key: str) -> list[tuple[str, str, int, int]]:
    """The providers of `key` that `target` names (asked from outside, with the cluster key if
    the agents have one): (id hex, host, registry port, record state)."""
    return nsexec.call_in_netns(c.topology.upstream, _providers, target, key, cluster_key(c))


def cluster_key(c: Cluster) -> bytes | None:
    """The DHT key the agents of `c` run with, if they run with one."""
    return _OBSERVER_KEYS[id(c)]


def out_ranking(key: str, honest: list[bytes]) -> bytes:
    """An id whose claim of `key` would win the tie-break against every honest node's."""
    best = min(claim_rank(h, key) for h in honest)
    while True:
        candidate = os.urandom(32)
        if claim_rank(candidate, key) < best:
            return candidate


# -- the cases ----------------------------------------------------------------------------------


def test_id_spoofing_repoints_and_deletes_nothing(c: Cluster, tmp_path: Path) -> None:
    img, ref = fresh_image(c, tmp_path, "spoof")
    n1, n2, n3 = c.node(1), c.node(2), c.node(3)
    n1.pull(ref)
    honest = node_id(n1)
    keys = list(img.blob_digests())
    targets = [(n.ip, ag.ROUTER_PORT) for n in (n2, n3)]
    before = {n.name: contact_of(n, honest) for n in (n2, n3)}
    assert all(before[n.name] == (n1.ip, ag.ROUTER_PORT) for n in (n2, n3)), before
    deadline = time.monotonic() + 30
    while not all(  # n1's records reached both (its announces are paced)
        (honest.hex(), n1.ip, ag.REGISTRY_PORT, RecordState.COMPLETE) in providers_at(c, t, k)
        for t in targets
        for k in keys
    ):
        assert time.monotonic() < deadline, "n1's records never reached n2 and n3"
        time.sleep(0.5)

    result = nsexec.call_in_netns(c.topology.upstream, spoof, targets, honest, keys)

    sent = result["sent"]
    assert sent["AddProvider"] == 2 * len(keys) * len(targets) and sent["Ping"] >= 2 * len(targets)
    # the honest contact did not move, though the rogue echoed the nonces
    assert {n.name: contact_of(n, honest) for n in (n2, n3)} == before
    # and every target still names n1 (only), at n1's address and registry port, for every key
    expected = [(honest.hex(), n1.ip, ag.REGISTRY_PORT, RecordState.COMPLETE)]
    for t in targets:
        for k in keys:
            entries = providers_at(c, t, k)
            assert entries == expected, (t, k, entries)
    # pulls are still served by peers
    mark = c.upstream.mark()
    error = Pull(n3, ref).wait()
    assert error is None, error
    assert_intact(n3, img)
    from_upstream = upstream_blobs(c, n3, mark)
    assert not from_upstream & set(keys), from_upstream
    refused = sum(dht_stat(n, "moves_refused") for n in (n2, n3))
    report(
        "id spoofing",
        f"sent {sent}, echoed {result['echoed']} nonces; contacts unchanged, n1's records intact "
        f"on both targets, {refused} moves refused; n3's pull served by peers",
    )


def test_record_and_claim_flooding_gain_nothing(c: Cluster, tmp_path: Path) -> None:
    img, ref = fresh_image(c, tmp_path, "flood")  # nobody holds it: a burst would claim
    n1, n2, n3 = c.node(1), c.node(2), c.node(3)
    ids = [node_id(n) for n in c.nodes]
    keys = list(img.blob_digests())
    claims = {k: out_ranking(k, ids) for k in keys}
    targets = [(n.ip, ag.ROUTER_PORT) for n in c.nodes]
    held = {n.name: dht_stat(n, "records_held") for n in c.nodes}
    bad = sum(dht_stat(n, "bad_datagrams") for n in c.nodes)
    waits = {n.name: counter(n, "spegla_claim_outcomes_total", outcome="wait_timeout")
             for n in c.nodes}  # fmt: skip

    result = nsexec.call_in_netns(c.topology.upstream, flood, targets, claims, FLOOD)

    sent = result["sent"]
    assert sent["AddProvider"] == (FLOOD + len(keys)) * len(targets), sent
    # the first pull decides on its claims with the planted ones in place: nobody waits for them
    started = time.monotonic()
    error = Pull(n2, ref).wait()
    first = time.monotonic() - started
    assert error is None, error
    assert_intact(n2, img)
    # the second pull is served by peers (n2 holds it now, once its records are out)
    wait_served_by_peer(n3, f"e2e/{img.name}", tuple(keys), timeout=30.0)
    mark = c.upstream.mark()
    error = Pull(n3, ref).wait()
    assert error is None, error
    assert_intact(n3, img)
    from_upstream = upstream_blobs(c, n3, mark)
    assert not from_upstream & set(keys), from_upstream
    for n in (n1, n2, n3):
        after = counter(n, "spegla_claim_outcomes_total", outcome="wait_timeout")
        assert after == waits[n.name], (n.name, waits[n.name], after)
    # each planted claim was refused, or dropped unread (with a cluster key the attacker lacks)
    refused_claims = sum(dht_stat(n, "claims_refused") for n in c.nodes)
    dropped = sum(dht_stat(n, "bad_datagrams") for n in c.nodes) - bad
    assert refused_claims + dropped >= len(keys) * len(targets), (refused_claims, dropped)
    gained = {n.name: dht_stat(n, "records_held") - held[n.name] for n in c.nodes}
    # no node names the attacker for any key of the image (its claims were refused)
    for t in targets:
        for k in keys:
            named = providers_at(c, t, k)
            assert all(host != UPSTREAM_IP for _, host, _, _ in named), (t, k, named)
    report(
        "record and claim flooding",
        f"sent {sent}; stored {result['stored']} of them, refused {result['refused']} "
        f"({refused_claims} claims refused, {dropped} datagrams dropped unread); records held "
        f"grew by {gained}; first pull "
        f"{first:.1f}s with no claim wait; second pull served by peers",
    )
