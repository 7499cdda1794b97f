"""Claims and the upload bound over real loopback sockets: apps, peer client, Router fake.

A burst: several nodes miss one blob at the same moment; one becomes the claimant (404 at once,
its containerd goes upstream), the others wait until the claimant holds it and fetch it from
there.  Claims go through the same Router as other records (`RouterClaimBoard`).
"""

from __future__ import annotations

from dataclasses import replace

import httpx
import pytest
import trio
import trio.testing

from registry.burst.claim_supply import ClaimParticipation
from registry.interfaces import PeerState
from registry.metrics import CLAIM_OUTCOMES, UPLOADS_BUSY
from registry.mirror.job import MirrorSettings
from registry.serve.app import RegistrySettings
from tests.clocks import loopback_clock
from tests.fakes import MemoryContentStore, MemoryNetwork, MemoryRouter, sha256_digest
from tests.registry.conftest import ScriptedPeer, StartNode, StartScripted

BLOB = bytes(range(256)) * 4096  # 1 MiB
DIGEST = sha256_digest(BLOB)
PATH = f"/v2/library/app/blobs/{DIGEST}?ns=docker.io"


class RouterClaimBoard:
    """Claims as CLAIM records of the node's own Router (what the agent's advertiser does)."""

    def __init__(self, router: MemoryRouter) -> None:
        self.router = router
        self.claimed: list[str] = []
        self.unclaimed: list[str] = []

    async def claim(self, digest: str) -> None:
        self.claimed.append(digest)
        if self.router.state(digest) is None:
            await self.router.advertise([digest], PeerState.CLAIM)

    async def unclaim(self, digest: str) -> None:
        self.unclaimed.append(digest)
        if self.router.state(digest) is PeerState.CLAIM:
            await self.router.withdraw([digest])


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return loopback_clock()  # virtual time (tests.clocks)


def settings(wait: float = 5.0) -> RegistrySettings:
    # real sockets on a busy machine: attempts of 100 ms, a settle well above a loopback store
    mirror = MirrorSettings(
        resolve_timeout=0.1,
        response_timeout=2.0,
        claim_settle=0.1,
        claim_wait=wait,
        claim_poll=0.05,
    )
    return RegistrySettings(mirror=mirror)


async def burst_node(
    start_node: StartNode, network: MemoryNetwork, wait: float = 5.0
) -> tuple[object, MemoryContentStore, RouterClaimBoard]:
    store = MemoryContentStore()
    router = MemoryRouter(network)
    board = RouterClaimBoard(router)
    claims = ClaimParticipation(board, b"")
    node = await start_node(store, settings=settings(wait), router=router, claims=claims)
    return node, store, board


def outcome(name: str) -> float:
    return CLAIM_OUTCOMES.labels(name)._value.get()  # type: ignore[no-any-return]


async def test_a_lone_miss_claims_and_answers_404_within_the_resolve_budget(
    clock: trio.testing.MockClock, start_node: StartNode, network: MemoryNetwork
) -> None:
    store = MemoryContentStore()
    router = MemoryRouter(network)
    board = RouterClaimBoard(router)
    node = await start_node(store, router=router, claims=ClaimParticipation(board, b""))
    before = outcome("claimant")
    async with node.client() as http:  # type: ignore[attr-defined]
        started = trio.current_time()
        response = await http.get(PATH)
        elapsed = trio.current_time() - started
    assert response.status_code == 404
    assert 0 < elapsed <= 3 * 0.020 + 1e-9  # inside the 20 ms x 3 budget (virtual time)
    assert outcome("claimant") == before + 1
    assert board.claimed == [DIGEST]
    assert router.state(DIGEST) is PeerState.CLAIM  # held for the claimant's download


async def test_burst_one_claimant_the_other_streams_from_it(
    clock: trio.testing.MockClock, start_node: StartNode, network: MemoryNetwork
) -> None:
    a, a_store, a_board = await burst_node(start_node, network)
    b, b_store, b_board = await burst_node(start_node, network)
    answers: dict[str, tuple[int, bytes, float]] = {}
    first_answer = trio.Event()
    started = trio.current_time()

    async def pull(name: str, node: object) -> None:
        async with node.client() as http:  # type: ignore[attr-defined]
            response = await http.get(PATH)
        answers[name] = (response.status_code, response.content, trio.current_time() - started)
        first_answer.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pull, "a", a)
        nursery.start_soon(pull, "b", b)
        # the claimant answers 404 at once; its "containerd" then fetches the blob upstream
        await first_answer.wait()
        claimant = next(iter(answers))
        status, _, first_at = answers[claimant]
        assert status == 404 and first_at < 1.5
        await trio.sleep(0.3)  # the waiter is still waiting: its containerd has not been told 404
        assert len(answers) == 1
        (a_store if claimant == "a" else b_store).add(BLOB)
        router = (a_board if claimant == "a" else b_board).router
        await router.advertise([DIGEST], PeerState.COMPLETE)
    waiter = "b" if claimant == "a" else "a"
    status, body, _ = answers[waiter]
    assert status == 200 and body == BLOB
    assert (a_board if waiter == "a" else b_board).unclaimed or not (
        a_board if waiter == "a" else b_board
    ).claimed


async def test_a_claimant_whose_download_never_appears_lets_the_waiter_go_upstream(
    clock: trio.testing.MockClock, start_node: StartNode, network: MemoryNetwork
) -> None:
    waiter, _, _ = await burst_node(start_node, network, wait=0.6)
    ghost = MemoryRouter(network)  # a node that claimed and then died with its containerd
    ghost.self_peer = waiter.peer.__class__(b"\x00" * 32, "127.0.0.1", 9)  # type: ignore[attr-defined]
    await ghost.advertise([DIGEST], PeerState.CLAIM)
    before = outcome("wait_timeout")
    async with waiter.client() as http:  # type: ignore[attr-defined]
        started = trio.current_time()
        response = await http.get(PATH)
        first = trio.current_time() - started
        started = trio.current_time()
        again = await http.get(PATH)  # that claimant is distrusted now: no second wait
        second = trio.current_time() - started
    assert response.status_code == 404 and again.status_code == 404
    assert 0.6 <= first < 3.0
    assert second < 0.6
    assert outcome("wait_timeout") == before + 1


async def test_upload_limit_answers_busy_and_the_requester_moves_on(
    clock: trio.testing.MockClock,
    start_node: StartNode,
    network: MemoryNetwork,
    start_scripted: StartScripted,
) -> None:
    store = MemoryContentStore()
    big = b"x" * (32 << 20)
    big_digest = store.add(big)
    small_digest = store.add(BLOB)
    limited = RegistrySettings(peer_upload_limit=1)
    provider = await start_node(store, settings=limited)
    busy_before = UPLOADS_BUSY._value.get()
    async with httpx.AsyncClient(base_url=provider.url, timeout=10) as http:
        headers = {"X-Spegel-Mirrored": "true"}
        async with http.stream(
            "GET", f"/v2/a/blobs/{big_digest}?ns=docker.io", headers=headers
        ) as held:
            assert held.status_code == 200  # one upload in progress (we do not read its body)
            busy = await http.get(f"/v2/a/blobs/{big_digest}?ns=docker.io", headers=headers)
            other = await http.get(f"/v2/a/blobs/{small_digest}?ns=docker.io", headers=headers)
            local = await http.get(f"/v2/a/blobs/{big_digest}?ns=docker.io")  # not a peer
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
    assert busy.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert other.status_code == 200 and other.content == BLOB  # nobody uploads that key yet
    assert local.status_code == 200
    assert UPLOADS_BUSY._value.get() == busy_before + 1

    # a requester that meets a busy provider asks the next one, without using up an attempt
    busy_peer = await start_scripted(ScriptedPeer("429"))
    good = await start_scripted(ScriptedPeer("serve", body=BLOB, digest=DIGEST))
    client, _, _ = await burst_node(start_node, network)
    network.add(DIGEST, busy_peer.peer)
    network.add(DIGEST, good.peer)
    async with client.client() as http:  # type: ignore[attr-defined]
        response = await http.get(PATH)
    assert response.status_code == 200 and response.content == BLOB
    assert len(good.requests) == 1


async def test_a_lying_provider_is_followed_by_the_next_one_under_claims(
    clock: trio.testing.MockClock,
    start_node: StartNode,
    network: MemoryNetwork,
    start_scripted: StartScripted,
) -> None:
    """The whole body of a small blob is checked before a byte goes out; a peer whose bytes do
    not match is dropped and the next provider asked (the claim wait hears of it)."""
    liar = await start_scripted(ScriptedPeer("serve", body=b"x" * len(BLOB), digest=DIGEST))
    broken = await start_scripted(ScriptedPeer("500"))
    good = await start_scripted(ScriptedPeer("serve", body=BLOB, digest=DIGEST))
    client, _, _ = await burst_node(start_node, network)
    for peer in (liar, broken, good):
        network.add(DIGEST, peer.peer)
    async with client.client() as http:  # type: ignore[attr-defined]
        response = await http.get(PATH)
    assert response.status_code == 200 and response.content == BLOB


async def test_a_provider_that_refuses_for_good_is_not_waited_for_like_a_busy_one(
    clock: trio.testing.MockClock,
    start_node: StartNode,
    network: MemoryNetwork,
    start_scripted: StartScripted,
) -> None:
    """A provider at its upload limit (429) is worth waiting for, up to `claim_wait`; one whose own
    download has no source (429 with Spegla-Refused) is not: the request goes on at once (here:
    the lone claimant, 404, its containerd goes upstream)."""
    waited = {}
    for behaviour in ("429", "refuse"):
        provider = await start_scripted(ScriptedPeer(behaviour))
        client, _, _ = await burst_node(start_node, network, wait=1.0)
        digest = sha256_digest(behaviour.encode() * 1000)
        network.add(digest, replace(provider.peer, state=PeerState.INFLIGHT))
        started = trio.current_time()
        async with client.client() as http:  # type: ignore[attr-defined]
            response = await http.get(f"/v2/library/app/blobs/{digest}?ns=docker.io")
        assert response.status_code == 404
        waited[behaviour] = trio.current_time() - started
    assert waited["429"] == pytest.approx(1.0), waited  # waited for it: claim_wait, no longer
    assert waited["refuse"] < 0.5, waited


async def test_a_held_claim_is_withdrawn_as_soon_as_containerd_is_gone(
    clock: trio.testing.MockClock,
) -> None:
    """After answering 404 the claimant holds its claim while its containerd starts the download;
    if containerd dies meanwhile the claim goes at once (the waiters claim again), not after the
    whole hold."""
    board = RouterClaimBoard(MemoryRouter())
    up = True
    claims = ClaimParticipation(board, b"", containerd_up=lambda: up)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(claims.hold_then_unclaim, DIGEST, 10.0)
        nursery.start_soon(claims.hold_then_unclaim, "sha256:" + "1" * 64, 3.0)
        await trio.sleep(4.0)
        assert board.unclaimed == ["sha256:" + "1" * 64]  # a full hold while containerd is up
        up = False
        await trio.sleep(0.3)
        assert board.unclaimed[-1] == DIGEST
        assert trio.current_time() < 5.0
