"""`spegla watch`: the view from made-up feeds, then the real command against a running agent
(plain lines, a mirror request appearing, reconnecting across an agent restart, Ctrl-C exits 0),
and once on a real terminal: tmux runs it, its screen is captured, Ctrl-C is sent as a key."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from agent.observability.watch import ws_url
from agent.observability.watch_view import WatchView, progress_bar
from tests.agent.runtime.test_agent_process import free_port
from tests.harness.containerd import Containerd
from tests.harness.fixtures import on_one_line

REPO = Path(__file__).resolve().parents[3]

SNAPSHOT: dict[str, Any] = {
    "type": "snapshot",
    "node_id": "ab" * 32,
    "ready": False,
    "readiness": {"containerd": True, "router": False},
    "now": 1000.0,
    "peers": [{"node_id": "cd" * 32, "host": "10.0.0.2", "port": 5001}],
    "peer_traffic": [{"peer": "10.0.0.2:5000", "bytes_in": 2_500_000, "bytes_out": 0}],
    "images": [{"name": "docker.io/library/nginx:1.25"}],
    "summary": {"hit_ratio_5m": 0.75, "requests_5m": 4, "in_bps": 1500.0, "out_bps": 0.0},
    "transfers": [
        {
            "id": "t1",
            "key": "sha256:" + "e" * 64,
            "peer": "10.0.0.2:5000",
            "direction": "in",
            "bytes": 500,
            "total": 1000,
            "state": "running",
        }
    ],
    "results": [
        {
            "at": 999.0,
            "key": "sha256:" + "f" * 64,
            "outcome": "hit",
            "peer": "10.0.0.2:5000",
            "bytes": 2_500_000,
            "duration_ms": 35.0,
        }
    ],
}


def test_ws_url_from_what_people_type() -> None:
    assert ws_url("127.0.0.1:9090") == "ws://127.0.0.1:9090/debug/web/ws"
    assert ws_url("http://node:9090/debug/web/") == "ws://node:9090/debug/web/ws"
    assert ws_url("ws://[::1]:9090/debug/web/ws") == "ws://[::1]:9090/debug/web/ws"


def test_screen_shows_every_part_of_the_feed() -> None:
    view = WatchView(address="node:9090", status="live")
    view.apply(SNAPSHOT)
    miss = {"at": 1001.0, "key": "docker.io/library/x:1", "outcome": "miss", "duration_ms": 60.5}
    view.apply({"type": "mirror", "result": miss})
    screen = "\n".join(view.screen(120, 40))
    assert "not ready (router)" in screen and "hit ratio (5 min) 75% of 4" in screen
    assert "10.0.0.2:5001" in screen and "2.5 MB" in screen  # peer and its traffic
    assert "docker.io/library/nginx:1.25" in screen
    assert progress_bar(500, 1000, 20) in screen and "50.0%" in screen
    rows = [line for line in screen.splitlines() if "sha256:ffffffffffff" in line]
    assert rows and "hit" in rows[0] and "35.0" in rows[0]
    assert screen.index("library/x:1") < screen.index("sha256:ffffffffffff")  # newest first
    assert all(len(line) <= 50 for line in view.screen(50, 12))
    assert len(view.screen(120, 12)) == 12
    view.apply({"type": "transfer", "transfer": {**SNAPSHOT["transfers"][0], "state": "done"}})
    assert "TRANSFERS (0)" in "\n".join(view.screen(120, 40))


def test_plain_lines_once_per_result() -> None:
    view = WatchView(summary_every=10.0)
    first = view.lines_for(SNAPSHOT, now=100.0)
    assert any("mirror hit" in line for line in first) and any("summary" in line for line in first)
    assert view.lines_for(SNAPSHOT, now=105.0) == []  # same result again, summary not due
    again = view.lines_for({**SNAPSHOT, "results": []}, now=111.0)
    assert len(again) == 1 and "hit_ratio_5m=75%" in again[0]
    end = {**SNAPSHOT["transfers"][0], "state": "failed"}
    assert "transfer failed" in view.lines_for({"type": "transfer", "transfer": end}, 112.0)[0]


# --- against a running agent --------------------------------------------------------------------


class AgentProcess:
    """`spegla registry` on fixed loopback ports, so that a restart comes back on the same ones."""

    def __init__(self, ctr: Containerd, workdir: Path) -> None:
        self.ctr, self.workdir = ctr, workdir
        self.registry, self.metrics = free_port(), free_port()
        self.router = free_port(__import__("socket").SOCK_DGRAM)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = None

    def start(self) -> None:
        argv = [
            sys.executable, "-m", "agent", "registry",
            "--registry-addr", f"127.0.0.1:{self.registry}",
            "--router-addr", f"127.0.0.1:{self.router}",
            "--metrics-addr", f"127.0.0.1:{self.metrics}",
            "--containerd-sock", str(self.ctr.socket),
            "--containerd-content-path", str(self.ctr.content_path),
            "--data-dir", str(self.workdir / "data"), "--advertise-addr", "127.0.0.1",
            "--bootstrap-kind", "none", "--standalone", "true",
        ]  # fmt: skip
        self.log = open(self.workdir / "agent.log", "ab")
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.log, cwd=REPO)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.workdir / "agent.log").read_text()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{self.registry}/readyz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError("agent not ready")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.log is not None:
            self.log.close()

    def mirror_request(self) -> None:
        """A blob this node does not hold: the agent asks the DHT, finds nobody: a mirror miss."""
        url = f"http://127.0.0.1:{self.registry}/v2/library/x/blobs/sha256:{'a' * 64}?ns=docker.io"
        assert httpx.get(url).status_code == 404


@pytest.fixture
def agent(containerd_instance: Containerd, tmp_path: Path) -> Iterator[AgentProcess]:
    a = AgentProcess(containerd_instance, tmp_path)
    a.start()
    yield a
    a.stop()


def _wait_for(read: Any, needle: str, limit: float = 15.0) -> str:
    deadline = time.monotonic() + limit
    seen = ""
    while time.monotonic() < deadline:
        seen = read()
        if needle in seen:
            return seen
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} never showed; got:\n{seen}")


@pytest.mark.root
@on_one_line  # `spegla watch` reads the agent's feed, not containerd
def test_watch_follows_a_running_agent_across_a_restart(
    agent: AgentProcess, tmp_path: Path
) -> None:
    out_path = tmp_path / "watch.out"
    with open(out_path, "w") as out:
        watch = subprocess.Popen(
            [sys.executable, "-m", "agent", "watch", f"127.0.0.1:{agent.metrics}"],
            stdout=out, stderr=subprocess.PIPE, cwd=REPO, text=True,
        )  # fmt: skip
        try:
            _wait_for(out_path.read_text, "-- connected")
            agent.mirror_request()
            text = _wait_for(out_path.read_text, "mirror miss")
            assert "sha256:aaaaaaaaaaaa" in text and "\x1b[" not in text  # no TTY: plain text
            agent.stop()
            _wait_for(out_path.read_text, "-- disconnected")
            agent.start()
            text = _wait_for(lambda: out_path.read_text().split("-- disconnected", 1)[1],
                             "-- connected", limit=30)  # fmt: skip
            watch.send_signal(signal.SIGINT)
            assert watch.wait(10) == 0, watch.stderr.read() if watch.stderr else ""
        finally:
            if watch.poll() is None:
                watch.kill()
    assert "Traceback" not in (watch.stderr.read() if watch.stderr else "")


@pytest.mark.root
@on_one_line  # `spegla watch` reads the agent's feed, not containerd
def test_watch_on_a_terminal_in_tmux(agent: AgentProcess, tmp_path: Path) -> None:
    tmux = shutil.which("tmux")
    assert tmux, "tmux is installed by hack/setup.sh"
    sock = str(tmp_path / "tmux.sock")
    command = (
        f"cd {REPO} && {sys.executable} -m agent watch 127.0.0.1:{agent.metrics}; "
        "echo WATCH-EXITED-$?; sleep 60"
    )
    subprocess.run([tmux, "-S", sock, "new-session", "-d", "-x", "120", "-y", "40", command],
                   check=True)  # fmt: skip

    def screen() -> str:
        return subprocess.run([tmux, "-S", sock, "capture-pane", "-p"], capture_output=True,
                              text=True).stdout  # fmt: skip

    try:
        _wait_for(screen, "[connected to ws://")
        agent.mirror_request()
        shown = _wait_for(screen, "sha256:aaaaaaaaaaaa")
        assert "MIRROR REQUESTS" in shown and "PEERS (0)" in shown and "miss" in shown
        assert shown.splitlines()[0].startswith("spegla watch 127.0.0.1:")
        subprocess.run([tmux, "-S", sock, "send-keys", "C-c"], check=True)
        after = _wait_for(screen, "WATCH-EXITED-")
        assert "WATCH-EXITED-0" in after
        assert "MIRROR REQUESTS" not in after  # the alternate screen was left
    finally:
        subprocess.run([tmux, "-S", sock, "kill-server"], capture_output=True)
