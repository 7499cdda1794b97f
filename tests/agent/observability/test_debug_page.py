"""The debug page, rendered by headless Debian Chromium against running agents on a two-node
namespace cluster: node two pulls an image node one holds, then its page must show a summary line
(ready, one peer, a hit ratio, bytes received), node one's traffic, the mirror hits, the
throughput chart and the transfers table; and it must load nothing from outside the agent."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from html.parser import HTMLParser
from importlib import resources
from typing import Any

import pytest

from tests.e2e.shared import wait_served_by_peer
from tests.harness.agents import METRICS_PORT, start_agents
from tests.harness.cluster import Cluster, Node
from tests.harness.fixtures import on_one_line

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def test_page_loads_nothing_from_outside() -> None:
    page = (resources.files("agent.web") / "debug.html").read_text()
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", page)
    assert "@import" not in page and "url(" not in page and "@font-face" not in page
    assert re.findall(r"https?://[^\s\"'`]+", page) == ["http://www.w3.org/2000/svg"]


class Dom(HTMLParser):
    """The dumped DOM as {element id: text content} plus the attributes of every element."""

    def __init__(self) -> None:
        super().__init__()
        self.text: dict[str, str] = {}
        self.elements: list[tuple[str, dict[str, str]]] = []
        self._open: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        self.elements.append((tag, attributes))
        if tag in ("meta", "br", "polyline", "input", "link"):
            return
        self._open.append(attributes.get("id"))
        if attributes.get("id"):
            self.text.setdefault(attributes["id"], "")

    def handle_endtag(self, tag: str) -> None:
        if tag not in ("meta", "br", "polyline", "input", "link") and self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for ident in self._open:
            if ident:
                self.text[ident] += data

    def rows(self, table_id: str, html: str) -> list[str]:
        match = re.search(rf'<table id="{table_id}">(.*?)</table>', html, re.S)
        assert match, table_id
        return [re.sub(r"<[^>]+>", " ", row) for row in re.findall(r"<tr>(.*?)</tr>", match[1])]


def render(node: Node, workdir: str, path: str = "/debug/web/") -> str:
    chromium = shutil.which("chromium")
    assert chromium, "chromium is installed by hack/setup.sh"
    url = f"http://127.0.0.1:{METRICS_PORT}{path}"
    argv = [
        "ip", "netns", "exec", node.netns, chromium, *CHROMIUM_FLAGS,
        f"--user-data-dir={workdir}", "--virtual-time-budget=5000", "--dump-dom", url,
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.root
@pytest.mark.slow
@on_one_line  # the page renders the agent's feed, not containerd's
def test_debug_page_in_headless_chromium(cluster: Callable[..., Cluster]) -> None:
    c = cluster(nodes=2)
    start_agents(c)
    one, two = c.nodes
    assert c.images is not None
    ref = c.ref("small")
    one.pull(ref)
    blob = c.images.small.blob_digests()[-1]
    wait_served_by_peer(two, "small", (blob,))  # advertising is asynchronous
    two.pull(ref)

    with tempfile.TemporaryDirectory(prefix="spg-chromium-") as profile:
        html = render(two, profile)
        bare = Dom()
        bare.feed(render(two, profile, "/debug/web"))  # the feed's URLs are relative to the page
        assert bare.text["conn"] == "live" and bare.text["summary"].startswith("Ready")
    dom = Dom()
    dom.feed(html)
    summary = " ".join(dom.text["summary"].split())
    assert summary.startswith("Ready · 1 peer · hit ratio (5 min) "), summary
    ratio = re.search(r"hit ratio \(5 min\) (\d+)% of (\d+)", summary)
    assert ratio and int(ratio[1]) > 0, summary
    received = re.search(r"received ([\d.]+) (B|kB|MB)", summary)
    assert received and float(received[1]) > 0, summary
    assert dom.text["conn"] == "live"  # the websocket feed connected

    peers = dom.rows("peers", html)
    assert len(peers) == 2 and one.ip in peers[1], peers  # header + node one
    cells = peers[1].split()
    assert cells[2] != "0" and cells[3] in ("B", "kB", "MB"), peers[1]  # bytes received from it

    hits = [r for r in dom.rows("results", html) if " hit " in f" {r} "]
    assert hits and all(one.ip in r for r in hits), dom.rows("results", html)

    polylines = [a for tag, a in dom.elements if tag == "polyline"]
    assert {a["class"] for a in polylines} == {"series-in", "series-out"}
    received_series = next(a for a in polylines if a["class"] == "series-in")
    heights = {float(p.split(",")[1]) for p in received_series["points"].split()}
    assert len(heights) > 1, "the received-bytes line is flat although bytes came in"

    transfers = dom.rows("transfers", html)
    assert transfers[0].split()[:4] == ["direction", "key", "peer", "progress"]
    assert "no transfer in progress" in transfers[1] or "bar" in html
    assert dom.text["ntransfers"].isdigit() and dom.text["nimages"] != "0"


def test_transfer_rows_get_progress_bars() -> None:
    """The page's script, run by Chromium on a static copy fed one snapshot (no agent needed)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is installed by hack/setup.sh (as root)")
    import json

    from agent.observability.debug import DebugState
    from agent.observability.live_stats import Transfer

    state = DebugState(node_id="ab" * 32, clock=lambda: 1000.0)
    state.record_transfer(Transfer("t1", "sha256:" + "e" * 64, "10.0.0.2:5000", "in", 250, 1000,
                                   999.0, source="inflight"))  # fmt: skip
    state.record_transfer(Transfer("t2", "sha256:" + "f" * 64, "10.0.0.3:5000", "out", 10, None,
                                   999.0))  # fmt: skip
    page = (resources.files("agent.web") / "debug.html").read_text()
    snapshot: dict[str, Any] = state.snapshot()
    page = page.replace("connect();\n</script>", f"render({json.dumps(snapshot)});\n</script>")
    page = page.replace('fetch(base + "stats")', "Promise.reject()")
    with tempfile.TemporaryDirectory(prefix="spg-chromium-") as tmp:
        path = f"{tmp}/page.html"
        with open(path, "w") as fh:
            fh.write(page)
        out = subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp}/profile", "--dump-dom",
             f"file://{path}"], capture_output=True, text=True, timeout=90,
        )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    bar = r'<span class="bar( unknown)?"[^>]*><span( style="width: ([\d.]+)%;")?'
    bars = re.findall(bar, out.stdout)
    assert [(b[0], float(b[2] or 0)) for b in bars] == [("", 25.0), (" unknown", 0.0)], bars
    assert "Not ready: waiting for" in out.stdout and "fetching" in out.stdout
    assert "serving" in out.stdout and "inflight" in out.stdout
