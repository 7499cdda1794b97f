"""Run the real spegla agent on every node of a harness cluster, and read what it reports.

Why: the e2e tests, ``make demo`` and the cluster bench all start ``spegla registry`` the same way:
inside the node's namespace, pointed at that node's containerd, listening on the node's
``127.0.0.1:5000`` (the mirror in hosts.toml) and its address, bootstrapping statically from the
other nodes.  They then ask the same questions: is it ready, what do its counters say, which peer
served which blob.

API
- ``agent_argv(cluster, node, log_level="INFO", extra=())`` -> argv (pure, for inspection).
  Every agent gets the cluster's key (``cluster_key_file(cluster)``, as the base manifests mount
  the Secret); ``extra`` may override it, e.g. ``--cluster-key-file=`` for an agent without one.
  ``SPEGLA_E2E_AGENT`` (env) replaces ``python -m agent`` with another command (split on spaces),
  e.g. to run the same tests against another build of the agent.
- ``start_agents(cluster, log_level="INFO", extra=(), nodes=None, ready_timeout=30)``: start and
  wait until every agent's ``/readyz`` answers 200 (from inside its namespace); returns seconds.
- ``start_agent(cluster, node, ...)``, ``stop_agent(cluster, node)``, ``wait_ready(node, timeout)``.
- ``metrics(node)`` -> {(name, labels-tuple): value}; ``mirror_counts(node)`` -> (hits, misses).
- ``process_stats(pid)`` -> (rss_bytes, cpu_seconds); ``idle_usage(node, seconds)``.
- ``serving_peers(cluster, client, sending=False)`` -> nodes whose agent has a connection from
  ``client`` (``sending``: with bytes queued to it, i.e. mid-transfer).
- ``peer_serves(node)`` -> successful requests the agent answered for peers (from metrics).
- ``agent_log(node)`` -> list of JSON records; ``served_to(cluster, digest, client_ip)`` -> the
  nodes whose agent logs show they served ``digest`` to ``client_ip``.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .cluster import Cluster, Node
from .procs import Daemon

REGISTRY_PORT = 5000
ROUTER_PORT = 5001
METRICS_PORT = 9090


def cluster_key_file(cluster: Cluster, create: bool = False) -> Path:
    """The cluster key every agent of `cluster` reads (the base manifests' Secret); `create`
    writes a random one unless it exists."""
    path = cluster.workdir / "cluster-key" / "key"
    if create and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
        path.chmod(0o400)
    return path


def agent_argv(
    cluster: Cluster, node: Node, log_level: str = "INFO", extra: Sequence[str] = ()
) -> list[str]:
    peers = [f"{n.ip}:{ROUTER_PORT}" for n in cluster.nodes if n is not node]
    command = os.environ.get("SPEGLA_E2E_AGENT", "").split() or [sys.executable, "-m", "agent"]
    argv = [
        *command, "registry",
        "--log-level", log_level,
        "--registry-addr", f":{REGISTRY_PORT}",
        "--router-addr", f":{ROUTER_PORT}",
        "--metrics-addr", f":{METRICS_PORT}",
        "--containerd-sock", str(node.containerd.socket),
        "--containerd-namespace", "k8s.io",
        "--containerd-content-path", str(node.containerd.content_path),
        "--data-dir", str(node.workdir / "agent-data"),
        "--advertise-addr", node.ip,
        "--cluster-key-file", str(cluster_key_file(cluster)),
    ]  # fmt: skip
    if peers:
        argv += ["--bootstrap-kind", "static", "--static-bootstrap-peers", *peers]
    else:
        argv += ["--bootstrap-kind", "none", "--standalone", "true"]
    return argv + list(extra)


def wait_ready(node: Node, timeout: float = 30.0, daemon: Daemon | None = None) -> None:
    url = f"http://127.0.0.1:{REGISTRY_PORT}/readyz"
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if daemon is not None and not daemon.alive():
            raise RuntimeError(f"agent on {node.name} exited:\n{_tail(daemon)}")
        try:
            status, _, body = node.http_get(url, timeout=1.0)
            if status == 200:
                return
            last = f"{status} {body[:200]!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.05)
    tail = _tail(daemon) if daemon else ""
    raise TimeoutError(f"agent on {node.name} not ready after {timeout}s ({last})\n{tail}")


def _tail(d: Daemon, n: int = 25) -> str:
    return "\n".join(d.log_text().splitlines()[-n:])


def start_agent(
    cluster: Cluster,
    node: Node,
    log_level: str = "INFO",
    extra: Sequence[str] = (),
    ready_timeout: float | None = 30.0,
) -> Daemon:
    cluster_key_file(cluster, create=True)
    d = cluster.start_on_node(node, "agent", agent_argv(cluster, node, log_level, extra))
    if ready_timeout:
        wait_ready(node, ready_timeout, d)
    return d


def stop_agent(cluster: Cluster, node: Node) -> None:
    cluster.stop_on_node(node, "agent")


def start_agents(
    cluster: Cluster,
    log_level: str = "INFO",
    extra: Sequence[str] = (),
    nodes: Iterable[Node] | None = None,
    ready_timeout: float = 30.0,
) -> float:
    """Start the agents; returns the seconds from the first start until all were ready."""
    chosen = list(nodes) if nodes is not None else cluster.nodes
    t0 = time.monotonic()
    for n in chosen:
        start_agent(cluster, n, log_level, extra, ready_timeout=None)
    for n in chosen:
        wait_ready(n, ready_timeout, n.processes.get("agent"))
    cluster.configure_mirrors(REGISTRY_PORT)
    return time.monotonic() - t0


def process_stats(pid: int) -> tuple[int, float]:
    """(resident set size in bytes, user+system CPU seconds) from /proc."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss, (int(fields[11]) + int(fields[12])) / ticks


def idle_usage(node: Node, seconds: float = 5.0) -> dict[str, float]:
    """RSS (MB) and CPU (% of one core) of the node's agent over an idle window."""
    d = node.processes["agent"]
    _, cpu0 = process_stats(d.pid)
    time.sleep(seconds)
    rss, cpu1 = process_stats(d.pid)
    return {"rss_mb": round(rss / 1e6, 1), "cpu_pct": round(100 * (cpu1 - cpu0) / seconds, 2)}


def serving_peers(cluster: Cluster, client: Node, sending: bool = False) -> list[Node]:
    """Nodes whose agent port has an established connection from ``client`` right now
    (with ``sending``: only those with unsent bytes queued on it, i.e. mid-transfer)."""
    out = []
    for n in cluster.nodes:
        if n is client:
            continue
        r = subprocess.run(
            ["ip", "netns", "exec", n.netns, "ss", "-Htn", "state", "established",
             f"( sport = :{REGISTRY_PORT} )"],
            capture_output=True, text=True,
        )  # fmt: skip
        for line in r.stdout.splitlines():
            cols = line.split()  # Recv-Q Send-Q Local Peer
            if len(cols) >= 4 and cols[3].startswith(f"{client.ip}:"):
                if not sending or int(cols[1]) > 0:
                    out.append(n)
                    break
    return out


def _parse_prometheus(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def metrics(node: Node) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, _, body = node.http_get(f"http://127.0.0.1:{METRICS_PORT}/metrics")
    if status != 200:
        raise RuntimeError(f"{node.name}: /metrics answered {status}")
    return _parse_prometheus(body.decode())


def mirror_counts(node: Node) -> tuple[int, int]:
    """(hits, misses) summed over registries from ``spegel_mirror_requests_total``."""
    hits = misses = 0.0
    for (name, labels), v in metrics(node).items():
        if name == "spegel_mirror_requests_total":
            cache = dict(labels).get("cache")
            if cache == "hit":
                hits += v
            elif cache == "miss":
                misses += v
    return int(hits), int(misses)


def peer_serves(node: Node) -> int:
    """Requests this node's agent answered 200/206 for peers: successful ``/v2/*`` requests minus
    the mirror hits it answered for its own containerd (from its metrics)."""
    ok = 0.0
    for (name, labels), v in metrics(node).items():
        lab = dict(labels)
        if (
            name == "http_request_duration_seconds_count"
            and lab.get("handler", "").startswith("/v2")
            and lab.get("code") in ("200", "206")
        ):
            ok += v
    return int(ok) - mirror_counts(node)[0]


def agent_log(node: Node) -> list[dict[str, Any]]:
    d = node.processes.get("agent")
    path = d.log_path if d else node.workdir / "agent.log"
    out = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def _values(rec: dict[str, Any]) -> Iterable[str]:
    for v in rec.values():
        if isinstance(v, dict):
            yield from _values(v)
        else:
            yield str(v)


def served_to(cluster: Cluster, digest: str, client_ip: str) -> list[Node]:
    """Nodes whose agent logged serving ``digest`` to ``client_ip`` (request log lines)."""
    out = []
    for n in cluster.nodes:
        if n.ip == client_ip:
            continue
        for rec in agent_log(n):
            vals = list(_values(rec))
            if any(digest in v for v in vals) and any(v.split(":")[0] == client_ip for v in vals):
                out.append(n)
                break
    return out
