"""A lookup's results pushed to callbacks (`DhtRouter.watch`) and the pulled stream's wake-ups.

Real nodes on loopback UDP: found and done are delivered, a cancelled or finished watch leaves the
node's table, a callback that raises never reaches the node's loops.  The stream (`_PeerStream`)
is still one checkpoint per item, and a reader woken by an item returns in the step it is woken in.
"""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from dht.ids import ProviderInfo, RecordState
from dht.node import LookupWatch, Node, _PeerStream
from tests.dht.test_node import KEY, cluster, collect, make, until

OTHER = "sha256:" + "ab" * 32


class Steps(trio.abc.Instrument):
    """How many times each task was run (one step per pass of the run queue it was in)."""

    def __init__(self) -> None:
        self.counts: dict[trio.lowlevel.Task, int] = {}

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.counts[task] = self.counts.get(task, 0) + 1


class Recorder:
    def __init__(self) -> None:
        self.found: list[ProviderInfo] = []
        self.done = 0
        self.finished = trio.Event()

    def on_found(self, peer: ProviderInfo) -> None:
        self.found.append(peer)

    def on_done(self) -> None:
        self.done += 1
        self.finished.set()


async def test_a_watch_delivers_each_provider_and_its_end_then_leaves_the_table() -> None:
    async with trio.open_nursery() as nursery:
        a, b, c = await cluster(nursery, 3)
        await a.router.advertise([KEY])
        await until(lambda: b.router.known_providers(KEY) or c.router.known_providers(KEY), "store")
        seen = Recorder()
        with trio.fail_after(5):
            watch = c.router.watch(KEY, seen.on_found, seen.on_done)
            await seen.finished.wait()
        assert [p.node_id for p in seen.found] == [a.config.node_id]
        assert seen.found[0].state is RecordState.COMPLETE
        assert seen.done == 1
        assert c._streams == {} and not watch.active  # done: out of the table without a cancel
        nursery.cancel_scope.cancel()


async def test_a_watch_of_a_missing_key_ends_and_cancel_after_done_is_harmless() -> None:
    async with trio.open_nursery() as nursery:
        _, b = await cluster(nursery, 2)
        seen = Recorder()
        with trio.fail_after(5):
            watch = b.router.watch(OTHER, seen.on_found, seen.on_done)
            await seen.finished.wait()
        assert seen.found == [] and seen.done == 1
        watch.cancel()
        watch.cancel()
        assert not watch.active and b._streams == {}
        nursery.cancel_scope.cancel()


async def test_a_cancelled_watch_leaves_the_table_and_is_never_called_again() -> None:
    async with trio.open_nursery() as nursery:
        a, b = await cluster(nursery, 2)
        await a.router.advertise([KEY])
        seen = Recorder()
        watch = b.router.watch(KEY, seen.on_found, seen.on_done)
        assert len(b._streams) == 1  # the lookup is out: its replies are on the way
        watch.cancel()
        assert b._streams == {}
        # the replies arrive and are dropped; a later lookup still works
        assert [p.node_id for p in await collect(b.router, KEY)] == [a.config.node_id]
        assert seen.found == [] and seen.done == 0
        nursery.cancel_scope.cancel()


async def test_a_watch_cancelled_from_its_own_callback_stops_at_once() -> None:
    async with trio.open_nursery() as nursery:
        a, b, c = await cluster(nursery, 3)
        await a.router.advertise([KEY])
        await b.router.advertise([KEY])
        await until(lambda: len(c.router.known_providers(KEY)) == 2, "both records at c")
        found: list[ProviderInfo] = []
        done: list[bool] = []
        # c knows both records: both arrive before watch returns, in one push
        watch = c.router.watch(KEY, found.append, lambda: done.append(True))
        assert len(found) == 2
        watch.cancel()
        found.clear()
        watches: list[LookupWatch] = []

        def first_only(peer: ProviderInfo) -> None:
            found.append(peer)
            watches[0].cancel()

        watches.append(LookupWatch(c, first_only, lambda: done.append(True)))
        watches[0]._lookup_id = 12345  # as if in the table
        c._streams[12345] = watches[0]
        watches[0].push(c.router.known_providers(KEY))
        assert len(found) == 1 and not done and 12345 not in c._streams
        watches[0].finish()  # a LookupDone after the cancel: nothing
        assert not done
        nursery.cancel_scope.cancel()


async def test_a_raising_callback_is_logged_and_never_reaches_the_nodes_loops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def boom(_: object = None) -> None:
        raise RuntimeError("a bug in the registry's callback")

    async with trio.open_nursery() as nursery:
        a, b = await cluster(nursery, 2)
        await a.router.advertise([KEY])
        with caplog.at_level(logging.ERROR, logger="dht.node"):
            watch = b.router.watch(KEY, boom, boom)
            await until(lambda: not watch.active, "the watch ended")
        failures = [r for r in caplog.records if r.getMessage() == "dht lookup callback failed"]
        assert {r.callback for r in failures} == {"found", "done"}  # type: ignore[attr-defined]
        assert not [r for r in caplog.records if "datagram handling failed" in r.getMessage()]
        # the node is unharmed: its loops run, lookups and watches work
        assert [p.node_id for p in await collect(b.router, KEY)] == [a.config.node_id]
        seen = Recorder()
        b.router.watch(KEY, seen.on_found, seen.on_done)
        with trio.fail_after(5):
            await seen.finished.wait()
        assert [p.node_id for p in seen.found] == [a.config.node_id]
        nursery.cancel_scope.cancel()


async def test_a_watch_on_a_node_not_serving_ends_at_once() -> None:
    node: Node = make(7)
    seen = Recorder()
    watch = node.router.watch(KEY, seen.on_found, seen.on_done)
    assert seen.done == 1 and seen.found == [] and not watch.active and node._streams == {}


async def test_serve_ending_ends_its_watches() -> None:
    seen = Recorder()
    async with trio.open_nursery() as nursery:
        _, b = await cluster(nursery, 2)
        b.router.watch(OTHER, seen.on_found, seen.on_done)
        b.router.watch(KEY, seen.on_found, seen.on_done)
        nursery.cancel_scope.cancel()
    assert b._streams == {}
    assert seen.done == 2  # each exactly once: converged, or ended with the node


# -- the pulled stream's checkpoints ------------------------------------------------------------

PEER = ProviderInfo(b"\x01" * 32, "127.0.0.1", 5000, RecordState.COMPLETE)


async def test_an_item_already_there_is_still_a_checkpoint() -> None:
    stream = _PeerStream()
    stream.push([PEER])
    with trio.testing.assert_checkpoints():
        assert await stream.__anext__() == PEER
    stream.finish()
    with trio.testing.assert_checkpoints(), pytest.raises(StopAsyncIteration):
        await stream.__anext__()


@pytest.mark.parametrize("end", ["item", "finish"])
async def test_a_woken_reader_returns_in_the_step_it_was_woken_in(end: str) -> None:
    stream = _PeerStream()
    got: list[object] = []
    steps = Steps()

    async def reader() -> None:
        try:
            got.append(await stream.__anext__())
        except StopAsyncIteration:
            got.append(None)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        (task,) = nursery.child_tasks
        trio.lowlevel.add_instrument(steps)
        try:
            if end == "item":
                stream.push([PEER])
            else:
                stream.finish()
            await trio.testing.wait_all_tasks_blocked()
        finally:
            trio.lowlevel.remove_instrument(steps)
    assert got == ([PEER] if end == "item" else [None])
    # woken, it takes the item and ends in that same step (a second checkpoint would be two)
    assert steps.counts[task] == 1
