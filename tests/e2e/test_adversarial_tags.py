"""A rogue agent holding a forged image under a real tag gains nothing (issue 17, items 2 and 9).

Why end to end: what a tag means is decided where a node's containerd resolves it, through the
whole chain (hosts.toml, the node's agent, the DHT, a peer's answer).  Three namespace nodes on
real containerd: two honest agents configured as the base manifests configure them (the cluster
key), and a third running the same agent without the key (or with a key of its own), whose
containerd holds a different image under the same `name:tag` as the upstream one (pulled from
another repository of the upstream, then tagged with `ctr`).  The rogue's agent advertises that
tag and would serve it; the honest node's CRI pull of the tag must still get upstream's image,
while the rogue's datagrams are dropped (its DHT table stays empty) and nobody fetches anything
from it.

Second case: agents without the key still share digests (verified by their bytes), but never
resolve a tag through each other: the tag goes upstream, the blobs come from the peer.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from tests.e2e.shared import counter, upstream_blobs, wait_served_by_peer
from tests.harness import agents as ag
from tests.harness.cluster import UPSTREAM_HOST, Cluster, Node
from tests.harness.images import build_small

pytestmark = pytest.mark.root


def tag_answer(node: Node, repo: str, tag: str) -> tuple[int, str]:
    """(status, Docker-Content-Digest) of the tag at `node`'s own agent, asked like containerd."""
    url = f"http://127.0.0.1:{ag.REGISTRY_PORT}/v2/{repo}/manifests/{tag}?ns={UPSTREAM_HOST}"
    status, headers, _ = node.http_get(
        url, headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}
    )
    lowered = {k.lower(): v for k, v in headers.items()}
    return status, lowered.get("docker-content-digest", "")


def repo_digests(node: Node, ref: str) -> set[str]:
    image = node.cri.status(ref)
    assert image is not None, f"{node.name} has no {ref}"
    return {d.rpartition("@")[2] for d in image.repo_digests}


def wait_for(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    import time

    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
    return value


@pytest.mark.parametrize("rogue_key", ["none", "wrong"])
def test_a_rogue_agent_cannot_change_what_a_tag_means(
    rogue_key: str, cluster: Callable[..., Cluster]
) -> None:
    c = cluster(nodes=3)
    one, two, rogue = c.nodes
    assert c.images is not None
    genuine = c.images.small
    genuine_ref = c.ref("small")
    forged = build_small(c.workdir / "forged", name="forged")
    assert forged.top_digest != genuine.top_digest
    forged_ref = c.upstream.push(forged)  # another repository of the upstream: e2e/forged:v1

    # the honest agents as the base manifests run them (the cluster key), the rogue without it
    for node in (one, two):
        ag.start_agent(c, node, ready_timeout=None)
    rogue_flag = "--cluster-key-file="  # no key ...
    if rogue_key == "wrong":  # ... or a key of its own
        wrong = c.workdir / "rogue-key"
        wrong.write_text("the rogue's own key, 32 bytes!!\n")
        rogue_flag += str(wrong)
    ag.start_agent(c, rogue, extra=[rogue_flag], ready_timeout=None)
    for node in (one, two):
        ag.wait_ready(node, 30.0, node.processes.get("agent"))
    c.configure_mirrors(ag.REGISTRY_PORT)

    # the rogue's containerd holds the forged image under the genuine name:tag
    rogue.pull(forged_ref)
    subprocess.run(
        ["ctr", "--address", str(rogue.containerd.socket), "-n", "k8s.io",
         "images", "tag", "--force", forged_ref, genuine_ref],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    # its agent advertises the tag and answers it with the forged digest
    wait_for(
        lambda: tag_answer(rogue, "e2e/small", "v1") == (200, forged.top_digest),
        "the rogue to serve its forged tag",
    )
    wait_for(
        lambda: counter(rogue, "spegla_dht_datagrams_sent_total") > 0, "the rogue to send datagrams"
    )
    notices = [r for r in ag.agent_log(rogue) if "no cluster key" in str(r.get("msg", ""))]
    if rogue_key == "none":
        assert notices and notices[0]["level"].upper().startswith("WARN"), notices

    rogue_served = ag.peer_serves(rogue)  # the test's own question above, from its own node

    # node one holds the genuine image; node two pulls the tag: through node one (the tag too:
    # both hold the key), and what it gets is upstream's image
    one.pull(genuine_ref)
    wait_served_by_peer(two, "e2e/small", genuine.blob_digests())
    mark = c.upstream.mark()
    two.pull(genuine_ref)
    assert genuine.top_digest in repo_digests(two, genuine_ref)
    assert forged.top_digest not in repo_digests(two, genuine_ref)
    assert upstream_blobs(c, two, mark) == set()  # every blob from node one
    tag_upstream = [
        r for r in c.upstream.access_log(mark) if r.remote_ip == two.ip and r.manifest_ref == "v1"
    ]
    assert tag_upstream == [], "the tag was resolved through node one, not upstream"

    # what the rogue sent, and that it gained nothing: its datagrams were dropped by both honest
    # nodes (it never got a contact), and nobody fetched anything from it
    assert counter(rogue, "spegla_dht_advertised_keys") >= 1
    assert counter(rogue, "spegla_dht_routing_table_size") == 0
    for node in (one, two):  # the rogue retries its bootstrap with backoff: give it one round
        wait_for(
            lambda node=node: counter(node, "spegla_dht_bad_datagrams_total") > 0,
            f"{node.name} to drop the rogue's datagrams",
        )
    for digest in (forged.top_digest, *forged.blob_digests()):
        for node in (one, two):
            assert rogue not in ag.served_to(c, digest, node.ip), (digest, node.name)
    assert ag.peer_serves(rogue) == rogue_served


def test_without_the_key_digests_come_from_peers_but_tags_do_not(
    cluster: Callable[..., Cluster],
) -> None:
    c = cluster(nodes=2)
    one, two = c.nodes
    assert c.images is not None
    image, ref = c.images.small, c.ref("small")
    ag.start_agents(c, extra=["--cluster-key-file="])
    one.pull(ref)
    wait_served_by_peer(two, "e2e/small", image.blob_digests())
    # the tag is not resolved through the peer, at once, whatever hosts.toml allows
    status, digest = tag_answer(two, "e2e/small", "v1")
    assert (status, digest) == (404, "")
    mark = c.upstream.mark()
    two.pull(ref)
    assert image.top_digest in repo_digests(two, ref)
    assert upstream_blobs(c, two, mark) == set()  # the blobs came from node one
    tag_upstream = [
        r for r in c.upstream.access_log(mark) if r.remote_ip == two.ip and r.manifest_ref == "v1"
    ]
    assert tag_upstream, "the tag was resolved upstream"
