"""A peer that deleted content it advertised costs a puller one quick 404, never a timeout.

Why: when a node deletes an image it withdraws its keys at once, but the provider records other
nodes stored for it live on until their ttl (by design, as in Spegel).  A puller that resolves
such a key still finds the node, which answers the forwarded request (`X-Spegel-Mirrored: true`)
with 404.  The e2e "image deleted on a peer" test shows exactly these 404s.  Here, on loopback
with in-process agents, the real DHT and the real registry app: the pulling node must take the
404 as a failed attempt and move on at once (to a node that still holds the content, or a 404 of
its own so containerd goes upstream), even with a resolve timeout far longer than the test.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from agent.config import HostPort, RegistryConfig
from agent.runtime.run import AgentHandle, Hooks, run_agent
from agent.runtime.wiring import Backend
from registry.interfaces import Router
from tests.agent.runtime.test_run import config
from tests.fakes import MemoryContentStore, sha256_digest

BLOB = b"layer bytes held by the serving nodes " * 64
DIGEST = sha256_digest(BLOB)
LONG = 60.0  # a resolve timeout no test run waits out: a wait on it trips the hang bound below
HANG_BOUND = 20.0  # generous: a bound against hangs, not a speed assertion


@dataclass
class Node:
    """One in-process agent: its content, its router (as the tracker would use it), its port."""

    store: MemoryContentStore = field(default_factory=MemoryContentStore)
    router: Router | None = None
    handle: AgentHandle | None = None

    @property
    def url(self) -> str:
        assert self.handle is not None
        return f"http://127.0.0.1:{self.handle.registry_port}"

    async def delete(self, digest: str) -> None:
        """What the state tracker does on an image delete: content gone, key withdrawn."""
        assert self.router is not None
        self.store.remove(digest)
        await self.router.withdraw([digest])


def backend_for(node: Node) -> Callable[..., Any]:
    @asynccontextmanager
    async def factory(cfg: RegistryConfig, router: Router) -> AsyncIterator[Backend]:
        node.router = router

        async def run_tracker(
            *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        ) -> None:
            await router.advertise(sorted(node.store.digests()))
            task_status.started()
            await trio.sleep_forever()

        yield Backend(store=node.store, run_tracker=run_tracker)

    return factory


async def start_nodes(nursery: trio.Nursery, tmp: Path, holders: int) -> list[Node]:
    """A puller (returned last), then `holders` nodes holding BLOB that join through it, so that
    their announces store provider records on the puller."""
    nodes: list[Node] = []
    first_port: int | None = None
    for i in range(holders + 1):
        node = Node()
        if i > 0:
            node.store.add(BLOB)
        peers = () if first_port is None else (HostPort("127.0.0.1", first_port),)
        cfg = config(str(tmp / f"n{i}"), peers=peers, mirror_resolve_timeout=LONG)
        hooks = Hooks(backend=backend_for(node))
        node.handle = await nursery.start(
            functools.partial(run_agent, cfg, trio.Event(), hooks, handle_signals=False)
        )
        first_port = first_port if first_port is not None else cfg.router_addr.port
        nodes.append(node)
    return nodes[1:] + nodes[:1]


def blob_url(node: Node) -> str:
    return f"{node.url}/v2/library/app/blobs/{DIGEST}?ns=docker.io"


async def wait_served_by_peers(http: httpx.AsyncClient, puller: Node, holders: int) -> None:
    """Advertising is asynchronous: wait until the puller resolves every holder."""
    with trio.fail_after(HANG_BOUND):
        while True:
            r = await http.get(blob_url(puller))
            if r.status_code == 200 and r.content == BLOB:
                assert puller.router is not None
                found = set()
                async with puller.router.resolve(DIGEST) as peers:
                    async for peer in peers:
                        found.add(peer.port)
                if len(found) >= holders:
                    return
            await trio.sleep(0.05)


def answered_404(caplog: pytest.LogCaptureFixture, node: Node) -> bool:
    assert node.handle is not None
    port = f":{node.handle.registry_port}"
    return any(
        r.name == "registry.mirror.forwarder"
        and "peer answered 404" in str(getattr(r, "error", ""))
        and str(getattr(r, "peer", "")).endswith(port)
        for r in caplog.records
    )


async def test_deleted_on_the_only_holder_is_a_quick_404(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="registry.mirror.forwarder")
    holder, puller = await start_nodes(nursery, tmp_path, holders=1)
    async with httpx.AsyncClient(timeout=HANG_BOUND) as http:
        await wait_served_by_peers(http, puller, 1)
        await holder.delete(DIGEST)
        # the holder's own answer to a forwarded request is a 404 now
        direct = await http.get(blob_url(holder), headers={"X-Spegel-Mirrored": "true"})
        assert direct.status_code == 404
        caplog.clear()
        with trio.fail_after(HANG_BOUND):
            r = await http.get(blob_url(puller))
    assert r.status_code == 404  # containerd goes upstream
    assert answered_404(caplog, holder)  # the stale record was followed: the case under test
    error = r.json()["errors"][0]
    assert error["code"] == "BLOB_UNKNOWN"
    assert error["detail"]["attempts"] == 1  # one failed fetch, no resolve wait used up
    assert "exhausted" in error["message"]


async def test_deleted_on_one_of_two_holders_fails_over_to_the_other(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="registry.mirror.forwarder")
    gone, keeps, puller = await start_nodes(nursery, tmp_path, holders=2)
    async with httpx.AsyncClient(timeout=HANG_BOUND) as http:
        await wait_served_by_peers(http, puller, 2)
        await gone.delete(DIGEST)
        tried_stale = 0
        for _ in range(8):  # provider order is not fixed: ask until the stale one came first
            caplog.clear()
            with trio.fail_after(HANG_BOUND):
                r = await http.get(blob_url(puller))
            assert r.status_code == 200 and r.content == BLOB
            tried_stale += answered_404(caplog, gone)
            if tried_stale:
                break
    assert tried_stale, "the stale provider was never tried: the case under test did not happen"
    assert keeps.store.digests() == {DIGEST}
