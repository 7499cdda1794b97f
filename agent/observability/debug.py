"""What an operator looks at when a node misbehaves: the live Trio task tree, and the state behind
the debug page (peers, advertised images, recent mirror results, last success, services).

Why here and not in the registry: these views span every service of the agent. Updates reach live
viewers through bounded memory channels and are dropped when a viewer is slow (`WouldBlock`), so a
stuck browser tab can never stall the agent. Mirror outcomes arrive as the registry's explicit
events (`registry.events`, observed by `DebugState.on_mirror_event`); the registry does not know
this module.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import trio
from cachetools import LRUCache

from agent.observability.live_stats import LiveStats, Transfer
from registry.events import MirrorEvent, MirrorOutcome, PeerFetchFailed, TransferProgress

logger = logging.getLogger(__name__)


# --- task tree ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskNode:
    name: str
    location: str  # "file.py:123 function" of the innermost non-Trio frame, or ""
    children: tuple[TaskNode, ...] = ()


def _location(task: trio.lowlevel.Task) -> str:
    frames = [
        (frame, lineno)
        for frame, lineno in task.iter_await_frames()
        if "/trio/" not in frame.f_code.co_filename
    ]
    if not frames:
        return ""
    frame, lineno = frames[-1]
    return f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{lineno} {frame.f_code.co_name}"


def _walk(task: trio.lowlevel.Task) -> TaskNode:
    children: list[TaskNode] = []
    for nursery in task.child_nurseries:
        for child in sorted(nursery.child_tasks, key=lambda t: t.name):
            children.append(_walk(child))
    return TaskNode(task.name, _location(task), tuple(children))


def task_tree() -> TaskNode:
    """Snapshot of every task under the root task (call from inside `trio.run`)."""
    root = trio.lowlevel.current_root_task()
    if root is None:
        raise RuntimeError("task_tree() must run inside trio.run")
    return _walk(root)


def render_task_tree(node: TaskNode, depth: int = 0) -> str:
    lines = ["  " * depth + f"- {node.name}" + (f"  @ {node.location}" if node.location else "")]
    lines.extend(render_task_tree(child, depth + 1) for child in node.children)
    return "\n".join(lines)


def task_tree_json(node: TaskNode) -> dict[str, Any]:
    return {
        "name": node.name,
        "location": node.location,
        "children": [task_tree_json(child) for child in node.children],
    }


def count_tasks(node: TaskNode) -> int:
    return 1 + sum(count_tasks(child) for child in node.children)


# --- debug page state ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MirrorResult:
    """One mirror attempt as the debug page shows it."""

    at: float  # unix time
    key: str
    outcome: str  # "hit" / "miss" / "error"
    peer: str = ""
    duration_ms: float | None = None
    detail: str = ""
    bytes: int = 0  # body bytes received from the peer


@dataclass(slots=True)
class DebugState:
    """Everything the debug page shows, with providers for the parts owned by other services."""

    node_id: str = ""
    peers: Callable[[], Iterable[Any]] = lambda: ()
    images: Callable[[], Iterable[Any]] = lambda: ()  # names, or dicts with a "name"
    services: Callable[[], dict[str, str]] = dict
    ready: Callable[[], bool] = lambda: False
    ready_detail: Callable[[], dict[str, bool]] = dict
    sections: dict[str, Callable[[], Mapping[str, Any]]] = field(default_factory=dict)
    max_results: int = 50
    results: deque[MirrorResult] = field(default_factory=deque)
    last_success: float | None = None
    _subscribers: set[trio.MemorySendChannel[dict[str, Any]]] = field(default_factory=set)
    dropped: int = 0
    live: LiveStats = field(default_factory=LiveStats)
    # transfer id -> when it started, until its end event; ends that never come are forgotten
    # least recently used first, beyond 4x the transfers shown
    _transfer_started: LRUCache[str, float] = field(init=False, repr=False)
    clock: Callable[[], float] = time.time
    # what this agent trusts (`agent.node.setup.trust_summary`): the page shows `notice` when set
    trust: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._transfer_started = LRUCache(maxsize=max(1, 4 * self.live.max_transfers))

    def record_mirror(self, result: MirrorResult) -> None:
        self.results.appendleft(result)
        while len(self.results) > self.max_results:
            self.results.pop()
        if result.outcome == "hit":
            self.last_success = result.at
        self.live.mirrored(result.at, result.outcome, result.peer, result.bytes)
        self.publish({"type": "mirror", "result": asdict(result)})

    def record_transfer(self, transfer: Transfer) -> None:
        """A transfer started, moved on or ended (same `id`): shown live, then dropped."""
        self.publish({"type": "transfer", "transfer": self.live.transfer(transfer).as_dict()})

    def record_served(self, nbytes: int) -> None:
        self.live.served(self.clock(), nbytes)

    def on_mirror_event(self, event: MirrorEvent) -> None:
        """Observer for `registry.events.MirrorEvents`: one result per request or failed peer."""
        if isinstance(event, MirrorOutcome):
            detail = "mirror hit" if event.hit else f"mirror miss: {event.reason}"
            outcome, peer = ("hit" if event.hit else "miss"), event.peer or ""
            self.record_mirror(
                MirrorResult(
                    event.at, event.key, outcome, peer, event.duration_ms, detail, event.bytes
                )
            )
        elif isinstance(event, TransferProgress):
            started = self._transfer_started.setdefault(event.id, event.at)
            if event.state != "running":
                self._transfer_started.pop(event.id, None)
                if event.direction == "out":
                    self.live.served_to(event.at, event.peer, event.bytes)
            self.record_transfer(
                Transfer(
                    event.id,
                    event.key,
                    event.peer,
                    event.direction,
                    event.bytes,
                    event.total,
                    started,
                    state=event.state,
                    source=event.source,
                )
            )
        elif isinstance(event, PeerFetchFailed):
            self.record_mirror(
                MirrorResult(event.at, event.key, "error", event.peer, None, "peer fetch failed")
            )

    def publish(self, event: dict[str, Any]) -> None:
        """Fan out to live viewers; a full viewer channel drops the event (never blocks)."""
        for channel in list(self._subscribers):
            try:
                channel.send_nowait(event)
            except trio.WouldBlock:
                self.dropped += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.discard(channel)

    def subscribe(self, size: int = 64) -> trio.MemoryReceiveChannel[dict[str, Any]]:
        send, receive = trio.open_memory_channel[dict[str, Any]](size)
        self._subscribers.add(send)
        return receive

    def unsubscribe_closed(self) -> None:
        for channel in list(self._subscribers):
            try:
                channel.send_nowait({"type": "ping"})
            except trio.WouldBlock:
                pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.discard(channel)

    @property
    def viewers(self) -> int:
        return len(self._subscribers)

    def snapshot(self) -> dict[str, Any]:
        peers = []
        for peer in self.peers():
            peers.append(_describe_peer(peer))
        images = sorted(
            (image if isinstance(image, dict) else {"name": str(image)} for image in self.images()),
            key=lambda image: str(image.get("name", "")),
        )
        now = self.clock()
        return {
            "type": "snapshot",
            "node_id": self.node_id,
            "ready": self.ready(),
            "readiness": self.ready_detail(),
            "trust": dict(self.trust),
            "summary": self.live.summary(now),
            "peer_traffic": self.live.peer_traffic(),
            "transfers": self.live.transfers(),
            "throughput": self.live.throughput(now),
            "now": now,
            "last_success": self.last_success,
            "last_success_ago_s": None
            if self.last_success is None
            else round(now - self.last_success, 1),
            "peers": peers,
            "images": images,
            "results": [asdict(r) for r in self.results],
            "services": self.services(),
            "stats": {name: _section(read) for name, read in self.sections.items()},
        }


def _section(read: Callable[[], Mapping[str, Any]]) -> dict[str, Any]:
    try:
        return {str(k): _plain(v) for k, v in read().items()}
    except Exception as exc:  # a debug view must not fail because one source did
        return {"error": repr(exc)}


def _describe_peer(peer: Any) -> dict[str, Any]:
    if isinstance(peer, dict):
        return {str(k): _plain(v) for k, v in peer.items()}
    out: dict[str, Any] = {}
    for name in ("node_id", "host", "port", "last_seen", "rtt"):
        if hasattr(peer, name):
            out[name] = _plain(getattr(peer, name))
    if not out:
        out["peer"] = str(peer)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


# --- bytes served -------------------------------------------------------------------------------


async def watch_mirror_metrics(
    state: DebugState,
    interval: float = 1.0,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Feed the throughput views the bytes the registry has served (`http_response_size_bytes`).

    Mirror results (and the last success) reach the page as events (`on_mirror_event`).
    """
    task_status.started()
    served = bytes_served()
    while True:
        now_served = bytes_served()
        state.record_served(int(now_served - served))
        served = now_served
        await trio.sleep(interval)


def bytes_served() -> float:
    """Body bytes of every registry response so far (the `_sum` of Spegel's size histogram)."""
    from registry.metrics import HTTP_RESPONSE_SIZE

    total = 0.0
    for metric in HTTP_RESPONSE_SIZE.collect():
        for sample in metric.samples:
            if sample.name.endswith("_sum"):
                total += sample.value
    return total
