"""Task tree, debug state fan-out (drop when a viewer is slow), mirror events on the page, JSON log
lines, and the node id file."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import trio

from agent.logs import configure_logging
from agent.node.identity import load_or_create_node_id
from agent.observability.debug import (
    DebugState,
    MirrorResult,
    count_tasks,
    render_task_tree,
    task_tree,
    task_tree_json,
)
from registry.events import (
    MirrorEvent,
    MirrorEvents,
    MirrorOutcome,
    PeerFetchFailed,
    PeerQuarantined,
)


async def test_task_tree_shows_named_tasks_and_locations() -> None:
    async def parked_worker() -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(parked_worker, name="dht")
        await trio.testing.wait_all_tasks_blocked()
        tree = task_tree()
        text = render_task_tree(tree)
        assert text.startswith("- <init>")
        line = next(line for line in text.splitlines() if line.strip().startswith("- dht"))
        assert "parked_worker" in line and "test_debug_and_logs.py" in line
        data = task_tree_json(tree)
        assert data["name"] == "<init>" and count_tasks(tree) >= 3
        nursery.cancel_scope.cancel()


async def test_slow_viewer_drops_instead_of_blocking() -> None:
    state = DebugState(max_results=3)
    receive = state.subscribe(size=2)
    for i in range(5):
        state.record_mirror(MirrorResult(at=float(i), key=f"k{i}", outcome="hit"))
    assert state.dropped == 3 and state.last_success == 4.0
    assert [r.key for r in state.results] == ["k4", "k3", "k2"]
    first = receive.receive_nowait()
    assert first["result"]["key"] == "k0"
    await receive.aclose()
    state.unsubscribe_closed()
    assert state.viewers == 0


def outcome(key: str, *, hit: bool, at: float, peer: str | None = None) -> MirrorOutcome:
    reason = "" if hit else "could not find peer"
    return MirrorOutcome(at, key, "docker.io", "GET", hit, peer, (), 10, 12.0, 1, reason)


def test_mirror_events_become_page_results() -> None:
    state = DebugState()
    events = MirrorEvents()
    unsubscribe = events.subscribe(state.on_mirror_event)
    events.emit(outcome("sha256:aa", hit=False, at=1.0))
    assert state.last_success is None  # a miss is no success
    events.emit(PeerFetchFailed(2.0, "sha256:bb", "10.0.0.3:5000", "connection refused"))
    events.emit(PeerQuarantined(2.5, "sha256:bb", "10.0.0.3:5000", "docker.io"))  # not a result
    events.emit(outcome("sha256:bb", hit=True, at=3.0, peer="10.0.0.2:5000"))
    assert [(r.outcome, r.key, r.peer) for r in state.results] == [
        ("hit", "sha256:bb", "10.0.0.2:5000"),
        ("error", "sha256:bb", "10.0.0.3:5000"),
        ("miss", "sha256:aa", ""),
    ]
    assert state.results[0].duration_ms == 12.0 and state.last_success == 3.0
    assert state.results[2].detail == "mirror miss: could not find peer"
    unsubscribe()
    events.emit(outcome("sha256:cc", hit=True, at=4.0))
    assert len(state.results) == 3


def test_a_failing_observer_neither_breaks_the_emitter_nor_the_others() -> None:
    seen: list[MirrorEvent] = []

    def broken(event: MirrorEvent) -> None:
        raise RuntimeError("observer bug")

    events = MirrorEvents()
    events.subscribe(broken)
    events.subscribe(seen.append)
    events.emit(outcome("sha256:aa", hit=True, at=1.0))
    assert len(seen) == 1


def test_json_lines_render_extra_fields_and_errors() -> None:
    stream = io.StringIO()
    handler = configure_logging("INFO", stream)
    try:
        log = logging.getLogger("agent.test")
        log.debug("hidden")
        log.info("peer joined", extra={"peer": "10.0.0.1:5001", "node_id": b"\x01\x02", "n": 3})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["msg"] for line in lines] == ["peer joined", "failed"]
    assert lines[0]["peer"] == "10.0.0.1:5001" and lines[0]["node_id"] == "0102"
    assert lines[0]["n"] == 3 and lines[0]["level"] == "INFO" and lines[0]["logger"] == "agent.test"
    assert "ValueError: boom" in lines[1]["error"]


def test_node_id_persisted_and_repaired(tmp_path: Path) -> None:
    data = tmp_path / "spegla"
    first = load_or_create_node_id(str(data))
    assert len(first) == 32 and load_or_create_node_id(str(data)) == first
    assert os.stat(data / "node-id").st_mode & 0o777 == 0o600
    (data / "node-id").write_text("not hex")
    repaired = load_or_create_node_id(str(data))
    assert repaired != first and load_or_create_node_id(str(data)) == repaired
    assert load_or_create_node_id("") != load_or_create_node_id("")


def test_http2_loggers_capped_and_access_lines_follow_the_level() -> None:
    stream = io.StringIO()
    touched = [logging.getLogger(n) for n in ("", "registry", "registry.access", "hpack", "h2")]
    touched.append(logging.getLogger("grpclib"))
    levels = [log.level for log in touched]
    handler = configure_logging("DEBUG", stream)
    try:
        for name in ("hpack", "h2", "grpclib"):
            logging.getLogger(f"{name}.sub").debug("frame decoded")
            logging.getLogger(name).warning("kept")
        logging.getLogger("registry.access").debug("request")
        assert logging.getLogger("registry.access").isEnabledFor(logging.DEBUG)
        handler = configure_logging("INFO", stream)
        logging.getLogger("registry").setLevel(logging.DEBUG)  # as the agent does for its tap
        assert not logging.getLogger("registry.access").isEnabledFor(logging.DEBUG)
    finally:
        logging.getLogger().removeHandler(handler)
        for log, level in zip(touched, levels, strict=True):
            log.setLevel(level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["logger"], line["msg"]) for line in lines] == [
        ("hpack", "kept"),
        ("h2", "kept"),
        ("grpclib", "kept"),
        ("registry.access", "request"),
    ]
