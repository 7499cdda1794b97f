"""The debug page's script renders a real snapshot without errors (run under node with a tiny DOM
stand-in; skipped when node is not installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from importlib import resources

import pytest

from agent.debug import DebugState, MirrorResult

DOM = """
const elements = {};
function element(tag) {
  return { tag, children: [], textContent: "", className: "",
           append(...c) { this.children.push(...c); }, replaceChildren() { this.children = []; } };
}
globalThis.document = {
  getElementById: (id) => (elements[id] = elements[id] || element("#" + id)),
  createElement: (tag) => element(tag),
};
globalThis.location = { protocol: "http:", host: "127.0.0.1:9090" };
globalThis.setTimeout = () => 0;
globalThis.WebSocket = class { constructor(url) { globalThis.wsUrl = url; } };
"""


def test_page_script_renders_a_snapshot() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    page = (resources.files("agent.web") / "debug.html").read_text()
    script = re.search(r"<script>(.*)</script>", page, re.S)
    assert script is not None
    state = DebugState(
        node_id="ab" * 32,
        peers=lambda: [{"node_id": "cd" * 32, "host": "10.0.0.2", "port": 5001}],
        images=lambda: [
            {
                "name": "docker.io/library/nginx:1.25",
                "target": "sha256:aa",
                "digests": ["sha256:aa", "sha256:bb"],
            },
            "plain-name",
        ],
        services=lambda: {"dht": "running", "state": "starting"},
        ready_detail=lambda: {"containerd": True, "advertised": False, "router": True},
        sections={"dht": lambda: {"table_size": 2}, "broken": lambda: 1 / 0},  # type: ignore[dict-item]
    )
    state.record_mirror(MirrorResult(at=1.0, key="docker.io", outcome="hit", detail="2 request(s)"))
    state.record_mirror(
        MirrorResult(
            at=2.0, key="sha256:aa", outcome="error", peer="10.0.0.3:5000", duration_ms=3.25
        )
    )
    snapshot = json.dumps(state.snapshot())
    program = (
        DOM + script.group(1) + f"\nrender({snapshot});\n"
        "console.log(JSON.stringify({ws: globalThis.wsUrl, ready: elements.ready.textContent,"
        " last: elements.last.textContent, rows: elements.results.children.length,"
        " images: elements.images.children.length, peers: elements.npeers.textContent,"
        " stats: elements.stats.children.length}));"
    )
    out = subprocess.run([node, "-e", program], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ws"] == "ws://127.0.0.1:9090/debug/web/ws"
    assert result["ready"].startswith("no (containerd ok, advertised waiting")
    assert result["last"].endswith("s ago")
    assert result["stats"] == 2 and "ZeroDivisionError" in snapshot
    assert result["rows"] == 3 and result["images"] == 3 and str(result["peers"]) == "1"
