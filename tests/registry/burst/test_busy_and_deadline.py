"""A full uploader is not a miss, and no blob GET outlives its overall bound (loopback sockets).

A provider answering 429 (at its upload limit) is asked again after a short backoff, both on
the plain path and under claims, instead of the request giving up or waiting out Retry-After.
Every wait (a busy provider, a claimant whose download never appears) ends at
`request_deadline` with a 404, and the claim wait's outcome is counted.  Times are virtual
(MockClock), so the bounds asserted are exact on a loaded machine.
"""

from __future__ import annotations

import httpx
import pytest
import trio
import trio.testing

from registry.burst.claim_supply import ClaimParticipation
from registry.interfaces import PeerState
from registry.metrics import CLAIM_WAIT
from registry.mirror.job import MirrorSettings
from registry.serve.app import RegistrySettings
from tests.clocks import loopback_clock
from tests.fakes import MemoryContentStore, MemoryNetwork, MemoryRouter, sha256_digest
from tests.registry.burst.test_claims_loopback import RouterClaimBoard
from tests.registry.conftest import Node, ScriptedPeer, StartNode, StartScripted

BLOB = bytes(range(256)) * 1024
DIGEST = sha256_digest(BLOB)
PATH = f"/v2/library/app/blobs/{DIGEST}?ns=docker.io"
LAYER = {"Accept": "application/vnd.oci.image.layer.v1.tar+gzip, */*"}  # as containerd asks


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return loopback_clock()  # virtual time (tests.clocks)


def settings(deadline: float = 5.0, claim_wait: float = 10.0) -> RegistrySettings:
    mirror = MirrorSettings(
        resolve_timeout=0.1,
        response_timeout=2.0,
        claim_settle=0.1,
        claim_wait=claim_wait,
        claim_poll=0.05,
        request_deadline=deadline,
    )
    return RegistrySettings(mirror=mirror)


async def asking_node(
    start_node: StartNode, network: MemoryNetwork, claims: bool, **kw: float
) -> Node:
    router = MemoryRouter(network)
    participation = ClaimParticipation(RouterClaimBoard(router), b"") if claims else None
    return await start_node(settings=settings(**kw), router=router, claims=participation)


async def timed_get(node: Node, headers: dict[str, str]) -> tuple[httpx.Response, float]:
    async with node.client() as http:
        started = trio.current_time()
        response = await http.get(PATH, headers=headers)
        return response, trio.current_time() - started


def outcomes() -> float:
    """Claim waits observed (the histogram counts each request's wait once, by outcome)."""
    return sum(
        sample.value
        for metric in CLAIM_WAIT.collect()
        for sample in metric.samples
        if sample.name.endswith("_count")
    )


@pytest.mark.parametrize("claims", [False, True])
async def test_a_provider_at_its_upload_limit_is_asked_again_not_missed(
    clock: trio.testing.MockClock,
    start_node: StartNode,
    network: MemoryNetwork,
    start_scripted: StartScripted,
    claims: bool,
) -> None:
    provider = await start_scripted(ScriptedPeer("serve", BLOB, DIGEST, busy_first=3))
    network.add(DIGEST, provider.peer)
    node = await asking_node(start_node, network, claims)
    response, elapsed = await timed_get(node, LAYER)
    assert (response.status_code, response.content == BLOB) == (200, True)
    assert len(provider.requests) == 4  # three busy answers, then the transfer
    # backoff 0.1 + 0.2 + 0.4 s (claims: re-looked at every claim_poll), not Retry-After's 3 s
    assert elapsed < 1.5, elapsed


@pytest.mark.parametrize("claims", [False, True])
async def test_a_provider_busy_for_good_ends_in_404_at_the_request_deadline(
    clock: trio.testing.MockClock,
    start_node: StartNode,
    network: MemoryNetwork,
    start_scripted: StartScripted,
    claims: bool,
) -> None:
    provider = await start_scripted(ScriptedPeer("429"))
    network.add(DIGEST, provider.peer)
    node = await asking_node(start_node, network, claims, deadline=2.0, claim_wait=30.0)
    before = outcomes()
    response, elapsed = await timed_get(node, LAYER)
    assert response.status_code == 404
    assert elapsed == pytest.approx(2.0), elapsed  # at the deadline, not after
    assert len(provider.requests) >= 3  # asked again meanwhile
    assert outcomes() == before + (1 if claims else 0)  # the claim wait's end is counted


async def test_a_claim_wait_ends_at_the_request_deadline(
    clock: trio.testing.MockClock, start_node: StartNode, network: MemoryNetwork
) -> None:
    """A claimant whose download never appears holds a waiter no longer than the deadline,
    whatever `claim_wait` says."""
    node = await asking_node(start_node, network, True, deadline=1.5, claim_wait=30.0)
    ghost = MemoryRouter(network)  # claimed, then died with its containerd
    ghost.self_peer = node.peer.__class__(b"\x00" * 32, "127.0.0.1", 9)
    await ghost.advertise([DIGEST], PeerState.CLAIM)
    before = outcomes()
    response, elapsed = await timed_get(node, LAYER)
    assert response.status_code == 404
    assert elapsed == pytest.approx(1.5), elapsed  # at the deadline, not after
    assert outcomes() == before + 1


async def test_the_deadline_does_not_cut_a_body_in_transfer(
    clock: trio.testing.MockClock,
    start_node: StartNode,
    network: MemoryNetwork,
    start_scripted: StartScripted,
) -> None:
    """The bound is on finding a provider: a body whose first bytes came in time may take
    longer (its stall bound ends it: a small blob is checked whole first, so that is a 404)."""
    late = await start_scripted(ScriptedPeer("mute", BLOB, DIGEST, cut=1000))
    network.add(DIGEST, late.peer)
    store = MemoryContentStore()
    node = await start_node(store, settings=settings(deadline=1.0), router=MemoryRouter(network))
    response, elapsed = await timed_get(node, LAYER)
    assert response.status_code == 404
    assert elapsed >= 5.0, elapsed  # the stall bound ended it, not the 1 s deadline
    assert late.hung_up.is_set()
