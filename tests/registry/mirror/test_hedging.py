"""Hedging: the hedge delay (pure), and a frozen provider costing one hedge delay, not the 2 s
response timeout (real loopback sockets; Trio's MockClock drives the delays)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import httpx
import pytest
import trio
import trio.testing

from registry.interfaces import Peer
from registry.mirror.hedging import HedgeDelay, HedgePolicy
from registry.mirror.job import MirrorSettings
from registry.oci.mediatypes import OCI_MANIFEST
from registry.serve.app import RegistrySettings
from tests.clocks import loopback_clock
from tests.fakes import MemoryNetwork
from tests.registry.conftest import LOOPBACK, Node, ScriptedPeer, StartNode, StartScripted
from tests.registry.mirror.test_mirror_peers import advertise, provider_and_client


def test_no_history_means_the_floor() -> None:
    assert HedgeDelay().current() == 0.050


def test_delay_is_a_recent_quantile_clamped_to_floor_and_ceiling() -> None:
    delay = HedgeDelay(HedgePolicy(floor=0.05, ceiling=0.5, quantile=0.9, window=10))
    for ms in range(1, 11):  # 1..10 ms: all under the floor
        delay.observe(ms / 1000)
    assert delay.current() == 0.05
    for ms in (100, 110, 120, 130, 140, 150, 160, 170, 180, 190):  # the window rolls over
        delay.observe(ms / 1000)
    assert delay.current() == pytest.approx(0.180)  # p90 of the last ten
    for _ in range(10):
        delay.observe(3.0)  # every peer slow: capped well under a second
    assert delay.current() == 0.5
    delay.observe(float("nan"))
    delay.observe(-1)
    assert delay.current() == 0.5


def test_bad_policies_are_refused() -> None:
    for kwargs in ({"floor": 0}, {"floor": 1.0, "ceiling": 0.5}, {"quantile": 0}, {"window": 0}):
        with pytest.raises(ValueError):
            HedgePolicy(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        MirrorSettings(hedge_racers=0)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return loopback_clock()  # virtual time (tests.clocks)


@pytest.fixture
def frozen_peer() -> Iterator[Peer]:
    """A peer whose process is stopped: the kernel completes connects, nobody ever answers."""
    sock = socket.socket()
    sock.bind((LOOPBACK, 0))
    sock.listen(16)
    try:
        yield Peer(node_id=b"\xfe" * 32, host=LOOPBACK, port=sock.getsockname()[1])
    finally:
        sock.close()


SETTINGS = RegistrySettings(
    mirror=MirrorSettings(resolve_timeout=0.5, response_timeout=2.0, hedge_floor=0.05)
)


async def timed_get(client: Node, path: str) -> tuple[httpx.Response, float]:
    """GET `path` from `client`'s registry: the response and how long it took (trio's clock)."""
    async with client.client() as http:
        started = trio.current_time()
        response = await http.get(path)
        return response, trio.current_time() - started


@pytest.mark.parametrize("kind", ["layer", "manifest"])
async def test_frozen_provider_costs_one_hedge_delay(
    clock: trio.testing.MockClock,
    start_node: StartNode,
    network: MemoryNetwork,
    frozen_peer: Peer,
    kind: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    provider, content, client = await provider_and_client(start_node, network, SETTINGS)
    key = content.layer if kind == "layer" else content.manifest
    network.remove(key, provider.peer)
    advertise(network, key, frozen_peer, provider)  # the frozen one is asked first
    path = "blobs" if kind == "layer" else "manifests"
    caplog.set_level(logging.INFO, logger="registry.mirror.forwarder")
    response, elapsed = await timed_get(client, f"/v2/library/app/{path}/{key}?ns=docker.io")
    assert response.status_code == 200
    assert response.content == (content.layer_bytes if kind == "layer" else content.manifest_bytes)
    # one hedge delay (50 ms floor), not the 2 s response timeout
    assert 0.05 <= elapsed < 0.5, elapsed
    outcome = [r for r in caplog.records if r.getMessage() == "mirror hit"][-1]
    assert outcome.__dict__["hedged"] is True
    assert outcome.__dict__["peer"] == f"{LOOPBACK}:{provider.port}"
    # the frozen peer lost a race it was asked first in: for a while, requests that ask it
    # first ask the next provider at once (no second hedge delay)
    response, elapsed = await timed_get(client, f"/v2/library/app/{path}/{key}?ns=docker.io")
    assert response.status_code == 200
    assert elapsed < 0.05


async def test_without_hedging_a_frozen_provider_costs_the_response_timeout(
    clock: trio.testing.MockClock,
    start_node: StartNode,
    network: MemoryNetwork,
    frozen_peer: Peer,
) -> None:
    """The control: with hedge_racers=1 the same pull waits out the frozen peer."""
    settings = RegistrySettings(
        mirror=MirrorSettings(resolve_timeout=0.5, response_timeout=2.0, hedge_racers=1)
    )
    provider, content, client = await provider_and_client(start_node, network, settings)
    network.remove(content.layer, provider.peer)
    advertise(network, content.layer, frozen_peer, provider)
    response, elapsed = await timed_get(
        client, f"/v2/library/app/blobs/{content.layer}?ns=docker.io"
    )
    assert response.status_code == 200
    assert 2.0 <= elapsed < 2.05, elapsed  # the response timeout, not more


async def test_a_slow_start_is_raced_but_the_body_comes_from_one_peer(
    clock: trio.testing.MockClock,
    start_node: StartNode,
    network: MemoryNetwork,
    start_scripted: StartScripted,
) -> None:
    """Two providers that both answer: the hedge races the start only; the loser's connection
    is closed as soon as the winner answered, so its body is never read."""
    provider, content, client = await provider_and_client(start_node, network, SETTINGS)
    silent = await start_scripted(ScriptedPeer("silent"))
    network.remove(content.layer, provider.peer)
    advertise(network, content.layer, silent, provider)
    sent_before = provider.stats.answered
    async with client.client() as http:
        response = await http.get(f"/v2/library/app/blobs/{content.layer}?ns=docker.io")
        again = await http.get(f"/v2/library/app/blobs/{content.layer}?ns=docker.io")
    assert response.status_code == again.status_code == 200
    assert response.content == again.content == content.layer_bytes
    assert provider.stats.answered - sent_before == 2  # one request (and body) per pull
    assert len(silent.requests) == 2  # asked first each time, never waited out


@pytest.mark.parametrize("kind", ["layer", "manifest"])
async def test_headers_then_silence_costs_one_hedge_delay(
    clock: trio.testing.MockClock,
    start_node: StartNode,
    network: MemoryNetwork,
    start_scripted: StartScripted,
    kind: str,
) -> None:
    """A provider that sends its response head at once and then no body byte is hedged like a
    silent one: an answer is useful only once its first body bytes are here.  The loser's
    connection is closed (its cancel scope), not left to the 5 s stall timeout."""
    provider, content, client = await provider_and_client(start_node, network, SETTINGS)
    key = content.layer if kind == "layer" else content.manifest
    body = content.layer_bytes if kind == "layer" else content.manifest_bytes
    media_type = "application/octet-stream" if kind == "layer" else OCI_MANIFEST
    mute = await start_scripted(ScriptedPeer("mute", body, key, media_type))
    network.remove(key, provider.peer)
    advertise(network, key, mute, provider)  # the mute one is asked first
    path = "blobs" if kind == "layer" else "manifests"
    response, elapsed = await timed_get(client, f"/v2/library/app/{path}/{key}?ns=docker.io")
    assert response.status_code == 200
    assert response.content == body
    assert 0.05 <= elapsed < 0.5, elapsed  # one hedge delay, not stall_timeout (5 s)
    assert len(mute.requests) == 1
    with trio.fail_after(1):
        await mute.hung_up.wait()  # the loser was hung up on


async def test_without_hedging_headers_then_silence_costs_the_stall_timeout(
    clock: trio.testing.MockClock,
    start_node: StartNode,
    network: MemoryNetwork,
    start_scripted: StartScripted,
) -> None:
    """The control: one racer waits out the mute peer's first bytes (stall_timeout), then fails
    over to the good provider."""
    settings = RegistrySettings(
        mirror=MirrorSettings(resolve_timeout=0.5, response_timeout=2.0, hedge_racers=1)
    )
    provider, content, client = await provider_and_client(start_node, network, settings)
    mute = await start_scripted(ScriptedPeer("mute", content.layer_bytes, content.layer))
    network.remove(content.layer, provider.peer)
    advertise(network, content.layer, mute, provider)
    response, elapsed = await timed_get(
        client, f"/v2/library/app/blobs/{content.layer}?ns=docker.io"
    )
    assert response.status_code == 200
    assert response.content == content.layer_bytes
    assert settings.mirror.stall_timeout <= elapsed < settings.mirror.stall_timeout + 0.05


async def test_a_late_body_from_the_only_provider_is_waited_for(
    clock: trio.testing.MockClock,
    start_node: StartNode,
    network: MemoryNetwork,
    start_scripted: StartScripted,
) -> None:
    """With nobody to hedge to, a provider whose first bytes come after many hedge delays (but
    within the stall timeout) still serves: hedging adds company, it never cuts a peer short."""
    provider, content, client = await provider_and_client(start_node, network, SETTINGS)
    late = await start_scripted(ScriptedPeer("late", content.layer_bytes, content.layer, pause=1.5))
    network.remove(content.layer, provider.peer)
    advertise(network, content.layer, late)
    response, elapsed = await timed_get(
        client, f"/v2/library/app/blobs/{content.layer}?ns=docker.io"
    )
    assert response.status_code == 200
    assert response.content == content.layer_bytes
    assert 1.5 <= elapsed < 2.0, elapsed
    assert len(late.requests) == 1
