"""The resolve budget (`resolve_timeout` x `resolve_retries`, 20 ms x 3 by default) bounds a
miss from both sides, through the whole request path (loopback sockets, virtual time).

A lookup that never converges ends the request at exactly 3 x 20 ms of mock time, not later;
a provider the lookup delivers just inside the budget (59 ms) is used; one just outside it
(61 ms) is not.  The clock is a MockClock: its jumps land on the timers' deadlines, so the
asserted times are exact whatever the load of the machine.
"""

from __future__ import annotations

import json

import httpx
import pytest
import trio
import trio.testing

from registry.serve.app import RegistrySettings
from tests.fakes import MemoryContentStore, MemoryNetwork, MemoryRouter
from tests.registry.conftest import Node, StartNode, fill, with_key

SETTINGS = with_key(RegistrySettings())  # the defaults: 20 ms per wait, 3 waits
BUDGET = SETTINGS.mirror.resolve_timeout * SETTINGS.mirror.resolve_retries


@pytest.fixture
def clock() -> trio.testing.MockClock:
    # jumps only once every task has been idle this long in real time: loopback I/O between the
    # jumps completes well inside it, so virtual time passes only at timers
    return trio.testing.MockClock(autojump_threshold=0.02)


async def timed_get(node: Node, path: str) -> tuple[httpx.Response, float]:
    async with node.client() as http:
        started = trio.current_time()
        response = await http.get(path)
        return response, trio.current_time() - started


def test_the_defaults_are_the_documented_budget() -> None:
    assert (SETTINGS.mirror.resolve_timeout, SETTINGS.mirror.resolve_retries) == (0.020, 3)


async def test_a_lookup_that_never_converges_gives_up_at_the_budget_not_after(
    clock: trio.testing.MockClock, start_node: StartNode
) -> None:
    client = await start_node(settings=SETTINGS, router=MemoryRouter(converges=False))
    key = "sha256:" + "2" * 64
    response, elapsed = await timed_get(client, f"/v2/x/blobs/{key}?ns=docker.io")
    assert response.status_code == 404
    error = json.loads(response.content)["errors"][0]
    assert error["message"].startswith("waited too long for new peer")
    assert error["detail"] == {"attempts": 3}
    assert elapsed == pytest.approx(BUDGET, abs=1e-9)


@pytest.mark.parametrize(("arrives", "served"), [(0.059, True), (0.061, False)])
async def test_a_provider_found_inside_the_budget_is_used_one_outside_is_not(
    clock: trio.testing.MockClock,
    start_node: StartNode,
    network: MemoryNetwork,
    arrives: float,
    served: bool,
) -> None:
    content = fill(MemoryContentStore())
    provider_store = MemoryContentStore()
    fill(provider_store)
    provider = await start_node(provider_store, settings=SETTINGS)
    network.add(content.layer, provider.peer)
    # the lookup delivers the provider `arrives` seconds in, then never converges
    router = MemoryRouter(network, lookup_delay=arrives, converges=False)
    client = await start_node(settings=SETTINGS, router=router)
    path = f"/v2/library/app/blobs/{content.layer}?ns=docker.io"
    response, elapsed = await timed_get(client, path)
    if served:
        assert response.status_code == 200
        assert response.content == content.layer_bytes
        assert elapsed == pytest.approx(arrives, abs=1e-9)  # the peer fetch takes no mock time
    else:
        assert response.status_code == 404
        assert elapsed == pytest.approx(BUDGET, abs=1e-9)
