"""Lease leader election with the real kubernetes client against the fake API server."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable

import pytest
import trio
from kubernetes import client

from agent.config import HostPort, ListenAddr
from agent.node.bootstrap import KubernetesBootstrap
from agent.node.lease import (
    ElectionTiming,
    LeaseElector,
    LeaseRecord,
    Observation,
    decide,
    make_api_client,
    observe,
)
from agent.observability.metrics_server import serve_app
from tests.agent.fake_k8s import FakeApiServer, LeaseStore

FAST = ElectionTiming(
    lease_duration=2.0, renew_deadline=1.0, retry_period=0.2, request_timeout=(1.0, 1.0)
)


def rec(holder: str, renew: str = "t1", rv: str = "1") -> LeaseRecord:
    return LeaseRecord(holder=holder, renew_time=renew, transitions=0, resource_version=rv)


def test_decide_pure() -> None:
    seen = Observation(rec("b"), seen_at=100.0)
    assert decide(seen, "a", 105.0, 10.0).take is False
    assert decide(seen, "a", 105.0, 10.0).leader == "b"
    assert decide(seen, "a", 110.0, 10.0).take is True  # not renewed for a lease duration
    assert decide(Observation(rec(""), 100.0), "a", 100.0, 10.0).take is True
    mine = decide(Observation(rec("a"), 0.0), "a", 1000.0, 10.0)
    assert mine.take and not mine.transition
    # the clock restarts whenever the record changes, whatever the holder's renew time says
    assert observe(seen, rec("b", renew="t2"), 109.0).seen_at == 109.0
    assert observe(seen, rec("b", renew="t1", rv="9"), 109.0).seen_at == 100.0


Start = Callable[[], trio.Nursery]


@pytest.fixture
async def api(nursery: trio.Nursery) -> AsyncIterator[Callable[[], object]]:
    """Factory of fronts (each its own port) over one shared LeaseStore."""
    store = LeaseStore()
    stop = trio.Event()

    async def front() -> tuple[FakeApiServer, str]:
        server = FakeApiServer(store)
        port = await nursery.start(
            functools.partial(
                serve_app,
                server.app,
                ListenAddr("127.0.0.1", 0),
                shutdown_trigger=stop.wait,
                grace=0.1,
            )
        )
        return server, f"http://127.0.0.1:{port}"

    front.store = store  # type: ignore[attr-defined]
    yield front
    stop.set()


def elector(host: str, identity: str) -> LeaseElector:
    return LeaseElector(
        make_api_client(host=host), "spegla-leader-election", "spegla", identity, timing=FAST
    )


async def wait_for(condition: Callable[[], bool], limit: float = 15.0) -> None:
    """Poll a condition that changes in worker threads' wake (no event to wait on)."""
    with trio.fail_after(limit):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.02)


async def test_create_conflict_and_stale_update(api) -> None:  # type: ignore[no-untyped-def]
    _, url = await api()
    a, b = elector(url, "10.0.0.1:5001"), elector(url, "10.0.0.2:5001")
    assert await a.try_acquire_or_renew() is True
    assert api.store.writes == [("create", "10.0.0.1:5001")]
    assert await b.try_acquire_or_renew() is False
    assert b.leader == "10.0.0.1:5001"
    assert await a.try_acquire_or_renew() is True  # renewal
    # A stale update (old resourceVersion) is refused with 409 by the server...
    coord = client.CoordinationV1Api(make_api_client(host=url))
    lease = await trio.to_thread.run_sync(
        coord.read_namespaced_lease, "spegla-leader-election", "spegla"
    )
    await a.try_acquire_or_renew()
    with pytest.raises(client.exceptions.ApiException) as exc:
        await trio.to_thread.run_sync(
            functools.partial(
                coord.replace_namespaced_lease,
                "spegla-leader-election",
                "spegla",
                lease,
                _content_type="application/json",
            )
        )
    assert exc.value.status == 409
    # ...and a second create too (AlreadyExists), which the elector treats as "not leader".
    fresh = elector(url, "10.0.0.3:5001")
    api.store.leases.clear()
    results = []

    async def race(e: LeaseElector) -> None:
        results.append(await e.try_acquire_or_renew())

    async with trio.open_nursery() as n:
        for e in (fresh, elector(url, "10.0.0.4:5001"), elector(url, "10.0.0.5:5001")):
            n.start_soon(race, e)
    assert sorted(results) == [False, False, True]


async def test_leader_loss_and_takeover(api) -> None:  # type: ignore[no-untyped-def]
    front_a, url_a = await api()
    _, url_b = await api()
    a, b = elector(url_a, "10.0.0.1:5001"), elector(url_b, "10.0.0.2:5001")
    boot_a, boot_b = KubernetesBootstrap(a, 5001), KubernetesBootstrap(b, 5001)
    async with trio.open_nursery() as nursery:
        await nursery.start(boot_a.run)
        await wait_for(lambda: a.is_leader)
        async with trio.open_nursery() as b_nursery:
            await b_nursery.start(boot_b.run)
            with trio.fail_after(5):
                assert await boot_b.get() == [HostPort("10.0.0.1", 5001)]
            assert await boot_a.get() == []  # the leader has no seed but itself
            # A loses the API: it gives up leadership after the renew deadline, B takes over
            # after the lease duration without renewals.
            front_a.down = True
            await wait_for(lambda: not a.is_leader)
            await wait_for(lambda: b.is_leader)
            assert ("update", "10.0.0.2:5001") in api.store.writes
            front_a.down = False
            await wait_for(lambda: a.leader == "10.0.0.2:5001")
            assert not a.is_leader
            assert await boot_a.get() == [HostPort("10.0.0.2", 5001)]
            b_nursery.cancel_scope.cancel()
        # B shut down and released the lease: A takes it at its next step, not after expiry.
        assert ("update", "") in api.store.writes
        with trio.fail_after(FAST.lease_duration * 0.8):
            await wait_for(lambda: a.is_leader)
        nursery.cancel_scope.cancel()
