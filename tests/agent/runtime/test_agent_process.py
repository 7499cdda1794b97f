"""`python -m agent registry` as a real process against a real (loopback) containerd: ready,
metrics, debug tasks, SIGUSR1 task dump, SIGTERM -> exit 0; a dead containerd socket -> not ready,
still running.  (Start-to-ready time and idle RSS/CPU are measured by `bench.cluster`.)"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness.containerd import Containerd

pytestmark = pytest.mark.root  # a real containerd (tests.harness)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Agent:
    def __init__(self, sock: Path, content: Path, data_dir: Path, log: Path) -> None:
        self.registry = free_port()
        self.metrics = free_port()
        self.log = log
        argv = [
            sys.executable, "-m", "agent", "registry",
            "--registry-addr", f"127.0.0.1:{self.registry}",
            "--router-addr", f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
            "--metrics-addr", f"127.0.0.1:{self.metrics}",
            "--containerd-sock", str(sock), "--containerd-content-path", str(content),
            "--data-dir", str(data_dir), "--advertise-addr", "127.0.0.1",
            "--bootstrap-kind", "none", "--standalone", "true", "--log-level", "INFO",
        ]  # fmt: skip
        self.started = time.monotonic()
        self.stderr = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.stderr)

    def get(self, port: int, path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2.0)

    def wait_ready(self, limit: float = 30.0) -> float:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if self.get(self.registry, "/readyz").status_code == 200:
                    return time.monotonic() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(self.log.read_text()[-3000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.stderr.close()


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[[Containerd], Agent]]:
    made: list[Agent] = []

    def make(ctd: Containerd) -> Agent:
        agent = Agent(
            ctd.socket, ctd.content_path, tmp_path / "data", tmp_path / f"agent{len(made)}.log"
        )
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.stop()


def test_agent_process_ready_metrics_signals(
    containerd_instance: Containerd, agent_factory: Callable[[Containerd], Agent]
) -> None:
    agent = agent_factory(containerd_instance)
    agent.wait_ready()

    metrics = agent.get(agent.metrics, "/metrics").text
    assert "spegel_mirror_requests_total" in metrics and "process_resident_memory_bytes" in metrics
    tasks = agent.get(agent.metrics, "/debug/tasks").text
    assert "- dht" in tasks and "- state" in tasks
    assert agent.get(agent.metrics, "/debug/tasks?format=json").json()["tasks"] > 10
    assert agent.get(agent.registry, "/livez").status_code == 200

    agent.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 15  # a hang guard: the dump is written at once
    while "- <init>" not in agent.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(15) == 0
    agent.stderr.close()
    text = agent.log.read_text()
    assert "- <init>" in text  # the SIGUSR1 dump
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    messages = [r["msg"] for r in records]
    assert "agent started" in messages and "exit gracefully" in messages
    assert "agent ready" in messages
    assert all({"time", "level", "logger", "msg"} <= r.keys() for r in records)


def test_agent_without_containerd_is_alive_but_not_ready(
    containerd_instance: Containerd, agent_factory: Callable[[Containerd], Agent]
) -> None:
    containerd_instance.stop()
    agent = agent_factory(containerd_instance)
    deadline = time.monotonic() + 10
    status = 0
    while time.monotonic() < deadline:
        try:
            status = agent.get(agent.registry, "/readyz").status_code
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    assert status == 500 and agent.proc.poll() is None  # Spegel answers 500 when not ready
    containerd_instance.start()
    agent.wait_ready()
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(15) == 0


def test_keys_subcommand(containerd_instance: Containerd, tmp_path: Path) -> None:
    base = [sys.executable, "-m", "agent", "keys", "--containerd-namespace", "k8s.io"]
    ok = subprocess.run(
        [*base, "--containerd-sock", str(containerd_instance.socket)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert all(line.startswith("sha256:") or ":" in line for line in ok.stdout.splitlines())
    missing = subprocess.run(
        [*base, "--containerd-sock", str(tmp_path / "nope.sock")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 1
    assert [line for line in missing.stderr.splitlines() if not line.startswith("{")] == [
        line for line in missing.stderr.splitlines() if "error" in line and not line.startswith("{")
    ]
    assert "does not exist" in missing.stderr
