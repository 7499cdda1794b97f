"""One task tree: every long-lived task of a running agent is a supervised service, named, under
the agent's root nursery, with its own tasks below it (what `/debug/tasks` shows)."""

from __future__ import annotations

import functools
import re
from typing import Any

import httpx
import trio

from agent.runtime.run import Hooks, run_agent
from tests.agent.runtime.test_run import config, memory_backend, mini_app

SERVICES = {
    "signals",
    "dht",
    "debug-feed",
    "memory-trim",
    "metrics",
    "registry",
    "bootstrap-source",
    "bootstrap",
    "state",
}


def _find(node: dict[str, Any], child: str) -> dict[str, Any] | None:
    """The task whose children include one named `child` (depth first)."""
    if any(c["name"] == child for c in node["children"]):
        return node
    for c in node["children"]:
        found = _find(c, child)
        if found is not None:
            return found
    return None


async def test_debug_tasks_lists_every_service_under_the_root_nursery(tmp_path: Any) -> None:
    cfg = config(str(tmp_path), standalone=True)
    stop = trio.Event()
    hooks = Hooks(backend=memory_backend([], []), app=mini_app)
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(
            functools.partial(run_agent, cfg, stop, hooks, handle_signals=True)
        )
        url = f"http://127.0.0.1:{handle.metrics_port}/debug/tasks"
        async with httpx.AsyncClient() as http:
            with trio.fail_after(10):
                while True:
                    tree = (await http.get(url, params={"format": "json"})).json()
                    if tree["services"].get("state") == "running":
                        break
                    await trio.sleep(0.05)
            text = (await http.get(url)).text
        stop.set()

    owner = _find(tree["root"], "dht")
    assert owner is not None
    by_name = {child["name"]: child for child in owner["children"]}
    # each service is a direct child of the task that owns the root nursery, by its own name
    assert SERVICES <= set(by_name), sorted(by_name)
    # and nothing long-lived runs there unsupervised
    assert set(by_name) <= SERVICES | {"ready-watch"}, sorted(by_name)
    for name in SERVICES:
        assert by_name[name]["children"], f"{name} shows no task of its own"
    assert set(tree["services"]) >= SERVICES | {"ready-watch"}
    assert all(state in ("running", "stopped") for state in tree["services"].values())
    for name in SERVICES:  # the text view names them too
        assert re.search(rf"^ +- {name}(  @ .*)?$", text, re.MULTILINE), name
