"""Run-queue passes a miss's lookups and claim cost under load (what a saturated agent pays).

Why: with hundreds of busy tasks in Trio's run queue, each task spawn, wake-up of another task or
bare checkpoint on a request's critical path costs one whole pass of that queue.  This counts the
passes (Trio's run loop calls an Instrument's `before_io_wait` once per pass) while `--busy` tasks
spin on `trio.lowlevel.checkpoint()`; the count does not depend on the machine's speed, only on
how many hops the code takes.  Two real `dht.node.Node`s on 127.0.0.1 (loopback UDP only), the
agent's `RegistryRouter` over the seeker, claims through the agent's `KeyAdvertiser`:

  plain_miss     `PeerSupply`: start to the request seeing the lookup converge (nobody holds it)
  plain_known    `PeerSupply.next_peer` for a provider whose record the seeker already holds
  claim_publish  `KeyAdvertiser.claim` of a key nobody holds (before the settle window starts)
  claim_miss     `ClaimingSupply.next_peer` to the claimant's 404: first lookup, claim, second
                 lookup (settle window and resolve deadlines set to 0 and 10 s, so no timer ends
                 a step: every pass counted is a hop)

each with the Router `pushed` (its `watch` face, when the code has one) and `pulled` (a wrapper
without it: the lookup task iterating `resolve`).  Counted from the request's first line to it
seeing its answer (not its nursery's teardown, which the agent does after the response).  Medians
over `--runs` fresh keys; `ms` is wall time, for information only.

    python -m bench.lookup_hops [--busy 500] [--runs 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager
from typing import Any

import trio

from agent.advertising.advertiser import KeyAdvertiser
from agent.advertising.peer_router import RegistryRouter
from dht.node import Node, NodeConfig
from registry.burst.attempts import MirrorAttempts
from registry.burst.claim import ClaimSettings
from registry.burst.claim_supply import ClaimingSupply, ClaimParticipation
from registry.burst.supply import PeerSupply
from registry.interfaces import Peer, PeerState

# no timer may end a step: the first attempt and the decision wait for the lookups to converge
SETTINGS = ClaimSettings(
    resolve_timeout=10.0, settle=0.0, ingest_wait=10.0, poll=0.1, settle_max=0.0
)


class Passes(trio.abc.Instrument):
    """Counts passes of the run loop (one I/O poll each)."""

    def __init__(self) -> None:
        self.count = 0

    def before_io_wait(self, timeout: float) -> None:
        self.count += 1


class Pulled:
    """The agent's Router without its push face: lookups are iterated by a task."""

    def __init__(self, router: RegistryRouter) -> None:
        self._router = router

    def ready(self) -> bool:
        return self._router.ready()

    async def advertise(self, keys: Iterable[str], state: PeerState = PeerState.COMPLETE) -> None:
        await self._router.advertise(keys, state)

    async def withdraw(self, keys: Iterable[str]) -> None:
        await self._router.withdraw(keys)

    def resolve(self, key: str) -> AbstractAsyncContextManager[AsyncIterator[Peer]]:
        return self._router.resolve(key)

    def known_providers(self, key: str) -> list[Peer]:
        return self._router.known_providers(key)

    def lookups_reach_all(self) -> bool:
        return self._router.lookups_reach_all()


async def spin() -> None:
    while True:
        await trio.lowlevel.checkpoint()


Sample = tuple[int, float]  # passes, milliseconds


class Meter:
    """Passes and time from `start` to `stop`: a request's wait, without its nursery's teardown
    (which comes after the response in the agent)."""

    def __init__(self, passes: Passes) -> None:
        self._passes = passes
        self._start = (0, 0.0)
        self.sample: Sample = (0, 0.0)

    def start(self) -> None:
        self._start = (self._passes.count, time.perf_counter())

    def stop(self) -> None:
        count, t0 = self._start
        self.sample = (self._passes.count - count, (time.perf_counter() - t0) * 1000)


async def plain_miss(router: Any, key: str, meter: Meter) -> None:
    async with trio.open_nursery() as request:
        meter.start()
        supply = PeerSupply(router, key)
        supply.start(request)
        while await supply.next() is not None:
            pass
        meter.stop()
        request.cancel_scope.cancel()


async def plain_known(router: Any, key: str, meter: Meter) -> None:
    async with trio.open_nursery() as request:
        meter.start()
        supply = PeerSupply(router, key)
        supply.start(request)
        peer = await supply.next_peer(MirrorAttempts(key, max_attempts=3))
        meter.stop()
        if not isinstance(peer, Peer):
            raise RuntimeError(f"the provider's record was held, got {peer!r}")
        request.cancel_scope.cancel()


async def claim_publish(board: KeyAdvertiser, key: str, meter: Meter) -> None:
    meter.start()
    await board.claim(key)
    meter.stop()
    await board.unclaim(key)


async def claim_miss(router: Any, claims: ClaimParticipation, key: str, meter: Meter) -> None:
    async with trio.open_nursery() as request:
        meter.start()
        supply = ClaimingSupply(router, claims, SETTINGS, key, frozenset(), request, None)
        supply.start(request)
        result = await supply.next_peer(MirrorAttempts(key, max_attempts=3))
        meter.stop()
        if isinstance(result, Peer) or not supply.claimant:
            raise RuntimeError(f"a lone miss must end as the claimant, got {result!r}")
        await supply.finish()
        request.cancel_scope.cancel()


async def scenarios(busy: int, runs: int) -> dict[str, Any]:
    passes = Passes()
    provider = Node(NodeConfig(node_id=b"\x01" * 32, bind_host="127.0.0.1", bind_port=0))
    seeker = Node(NodeConfig(node_id=b"\x02" * 32, bind_host="127.0.0.1", bind_port=0))
    out: dict[str, Any] = {"busy_tasks": busy, "runs": runs}
    async with trio.open_nursery() as nursery:
        await nursery.start(provider.serve)
        await nursery.start(seeker.serve)
        assert provider.bound is not None
        await seeker.bootstrap([provider.bound])
        with trio.fail_after(10):
            await provider.router.wait_ready()
        for _ in range(busy):
            nursery.start_soon(spin)
        held = [f"sha256:{i:064x}" for i in range(10**6, 10**6 + runs)]
        await provider.router.advertise(held)  # stored at the seeker: known without a lookup
        with trio.fail_after(10):
            # the records travel over UDP: look again until they are there (bounded above)
            while not all(seeker.router.known_providers(key) for key in held):  # noqa: ASYNC110
                await trio.sleep(0.01)
        trio.lowlevel.add_instrument(passes)
        agent_router = RegistryRouter(seeker.router)
        board = KeyAdvertiser(agent_router)
        claims = ClaimParticipation(board, seeker.config.node_id, background=nursery)
        serial = 0
        for mode in ("pushed", "pulled"):
            router: Any = agent_router if mode == "pushed" else Pulled(agent_router)
            samples: dict[str, list[Sample]] = {}
            for run in range(runs):
                keys = [f"sha256:{serial + i:064x}" for i in range(3)]
                serial += 3
                meter = Meter(passes)
                await plain_miss(router, keys[0], meter)
                samples.setdefault("plain_miss", []).append(meter.sample)
                await plain_known(router, held[run], meter)
                samples.setdefault("plain_known", []).append(meter.sample)
                await claim_publish(board, keys[1], meter)
                samples.setdefault("claim_publish", []).append(meter.sample)
                await claim_miss(router, claims, keys[2], meter)
                samples.setdefault("claim_miss", []).append(meter.sample)
            out[mode] = {
                name: {
                    "passes": statistics.median(p for p, _ in values),
                    "ms": round(statistics.median(ms for _, ms in values), 2),
                }
                for name, values in samples.items()
            }
        trio.lowlevel.remove_instrument(passes)
        out["has_push_face"] = hasattr(agent_router, "watch")
        nursery.cancel_scope.cancel()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, default=500, help="tasks spinning on checkpoints")
    parser.add_argument("--runs", type=int, default=20, help="fresh keys per scenario")
    args = parser.parse_args()
    if not 0 <= args.busy <= 5000 or not 1 <= args.runs <= 200:
        parser.error("--busy must be 0..5000 and --runs 1..200")
    print(json.dumps(trio.run(scenarios, args.busy, args.runs)))


if __name__ == "__main__":
    main()
