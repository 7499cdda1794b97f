"""End-to-end: a provider with two addresses, the one its DHT records come from blackholed for
its registry port (a firewall dropping SYNs, as a broken address family would), is still served
from at once: its peers race connects to both addresses (issue 11, item 1).

A 2-node namespace cluster of its own (the firewall rule and the extra address go away with it).
n1 gets a second address on its interface and is told it (`--advertise-more-addrs`); TCP to its
first address's port 5000 is dropped inside n1's namespace, while its DHT (UDP) keeps working on
it.  Without the race every mirror request of n2 would wait out the 2 s response timeout and
then go upstream; with it n2's pull is served by n1, each request within a fraction of that.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.shared import assert_intact, cluster_with_agents, upstream_blobs
from tests.harness import agents as ag
from tests.harness.cluster import Cluster, Node
from tests.harness.images import build_small

pytestmark = pytest.mark.root


def _in(node: Node, *argv: str) -> None:
    subprocess.run(["ip", "netns", "exec", node.netns, *argv], check=True, capture_output=True)


def _second_ip(node: Node) -> str:
    first = node.ip.rsplit(".", 1)
    return f"{first[0]}.{int(first[1]) + 100}"  # same /24 as the cluster: reachable on the bridge


@pytest.fixture(scope="module")
def c() -> Iterator[Cluster]:
    # dialling a provider's addresses is the agents' behaviour, not containerd's: one line (1.6)
    with cluster_with_agents("spg-dial-", nodes=2, large_mib=1) as cl:
        yield cl


def test_a_provider_whose_first_address_is_blackholed_serves_via_its_second(
    c: Cluster, tmp_path: Path
) -> None:
    n1, n2 = c.node(1), c.node(2)
    second = _second_ip(n1)
    _in(n1, "ip", "addr", "add", f"{second}/24", "dev", "eth0")
    _in(n1, "iptables", "-A", "INPUT", "-d", n1.ip, "-p", "tcp", "--dport",
        str(ag.REGISTRY_PORT), "-j", "DROP")  # fmt: skip
    ag.stop_agent(c, n1)
    ag.start_agent(c, n1, extra=["--advertise-more-addrs", second])
    img = build_small(tmp_path / "img", name="dial-two-addresses")
    ref = c.upstream.push(img)
    n1.pull(ref)  # n1 holds it and advertises it, naming both addresses
    log_mark = len(ag.agent_log(n2))
    mark = c.upstream.mark()
    n2.pull(ref, timeout=60)
    assert upstream_blobs(c, n2, mark) == set()  # every blob came from n1
    assert_intact(n2, img)
    records = ag.agent_log(n2)[log_mark:]
    hits = [r for r in records if r.get("msg") == "mirror hit"]
    assert hits, "the pull went through n2's agent"
    assert all(r.get("peer", "").startswith(f"{n1.ip}:") for r in hits), hits
    failed = [r for r in records if r.get("msg") == "peer fetch failed"]
    assert not failed, failed
    slow = [r for r in hits if float(r["duration_ms"]) >= 1500]
    assert not slow, f"mirror requests waited out a connect: {slow}"
