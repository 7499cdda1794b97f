"""Load suite: one agent under 500 concurrent clients vs docker-registry, same mix, same run.

Why: spegla sits in the pull path of every pod; under load it must answer fast and right (no 5xx,
no wrong bytes, no false misses that send containerd upstream) and give memory and descriptors
back afterwards.  This starts a 2-node harness cluster (network namespaces, real containerd per
node, real agents with their DHT, docker-registry upstream), lets node 1 hold one image (local
blobs) and node 2 another (mirror hits for node 1), then runs `bench.load_client` inside node 1's
namespace: for `--duration` seconds, `--clients` keep-alive clients mixing local blob GETs,
mirror GETs, HEADs, misses and malformed requests against node 1's agent, then the same plan
against a docker-registry serving the same storage in the same namespace.  Agent RSS and open
descriptors are sampled idle, during and after the load.

    python -m bench.load --json                  (60 s per run, 500 clients)
    python -m bench.load --soak --json           (10 min against the agent only: RSS/fd drift)

The agents run with their defaults (what users run): `agent` in the JSON.  Then, for comparison,
the same load against agents restarted with `--peer-upload-limit 0` (no upload bound; labelled
`extra_runs.peer_upload_limit_0`, skip it with `--compare-upload-limit -1`), and last against
docker-registry.  Ratios are within the one run.

Needs root (namespaces, containerd).  Prints one JSON object on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.harness import agents as ag
from tests.harness import nsexec
from tests.harness.cluster import Cluster
from tests.harness.fixtures import missing_requirements
from tests.harness.images import BuiltImage, build_large
from tests.harness.procs import Daemon

COMPARE_PORT = 5002
WEIGHTS = {"local_get": 35, "mirror_get": 25, "head": 20, "miss": 10, "malformed": 10}
BLOB_MIB = 5  # per image: 5 layers of ~1 MiB


def progress(msg: str) -> None:
    print(f"[load {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def usage(pid: int) -> dict[str, float]:
    """RSS (MiB) and open descriptors of a process."""
    rss, _ = ag.process_stats(pid)
    return {"rss_mib": round(rss / 2**20, 1), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


class Sampler:
    """Samples a process's usage every second in a thread; peak and series."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.series: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.series.append(usage(self.pid))
            except OSError:
                return

    def peak(self) -> dict[str, float]:
        if not self.series:
            return {}
        return {
            "rss_mib": max(s["rss_mib"] for s in self.series),
            "fds": max(s["fds"] for s in self.series),
        }


def blob_specs(image: BuiltImage, repo: str) -> list[dict[str, Any]]:
    info = image.manifests[0]
    return [
        {
            "path": f"/v2/{repo}/blobs/{layer.digest}",
            "digest": layer.digest,
            "size": layer.size,
            "file": str(image.path / "blobs" / "sha256" / layer.digest.removeprefix("sha256:")),
        }
        for layer in info.layers
    ]


def log_since(node: Any, mark: int) -> list[dict[str, Any]]:
    """The agent's log records after the first `mark` (all of them if the log was restarted)."""
    records = ag.agent_log(node)
    return records[mark:] if len(records) >= mark else records


def miss_reasons(records: list[dict[str, Any]], keys: set[str]) -> dict[str, int]:
    """Why the agent's mirror requests for `keys` (content a peer holds) missed, from its log."""
    reasons: Counter[str] = Counter()
    for record in records:
        if record.get("cache") == "miss" and record.get("key") in keys:
            reason = str(record.get("reason", ""))
            reasons[reason.split(" sha256:")[0].removesuffix(" for").removesuffix(" of")[:120]] += 1
    return dict(reasons)


def peer_trouble(records: list[dict[str, Any]]) -> dict[str, int]:
    """The asking agent's "peer busy"/"peer refused"/"peer fetch failed" lines, by reason."""
    counts: Counter[str] = Counter()
    for record in records:
        msg = str(record.get("msg", record.get("message", "")))
        if msg in ("peer busy", "peer refused", "peer fetch failed"):
            why = str(record.get("reason", record.get("error", "")))[:80]
            counts[f"{msg}: {why}"] += 1
    return dict(counts)


def warnings(records: list[dict[str, Any]]) -> dict[str, int]:
    """WARNING and worse log lines of a node's agent, by message."""
    counts: Counter[str] = Counter()
    for record in records:
        if str(record.get("level", "")).upper() in ("WARNING", "ERROR", "CRITICAL"):
            counts[str(record.get("msg", record.get("message", "")))[:120]] += 1
    return dict(counts)


def run_client(cluster: Cluster, plan: dict[str, Any], work: Path, name: str) -> dict[str, Any]:
    plan_path = work / f"plan-{name}.json"
    plan_path.write_text(json.dumps(plan))
    node = cluster.node(1)
    argv = ["ip", "netns", "exec", node.netns, sys.executable, "-m", "bench.load_client"]
    done = subprocess.run(
        [*argv, str(plan_path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=plan["duration"] + 300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"load client failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def start_compare_registry(cluster: Cluster, work: Path) -> Daemon:
    """docker-registry in node 1's namespace serving the upstream's storage (read only use)."""
    cfg = work / "compare.yml"
    storage = cluster.upstream.workdir / "storage"
    cfg.write_text(
        "version: 0.1\n"
        "log: {level: info, accesslog: {disabled: false}}\n"
        f"storage:\n  filesystem: {{rootdirectory: {storage}}}\n"
        "  cache: {blobdescriptor: inmemory}\n"
        f"http:\n  addr: 127.0.0.1:{COMPARE_PORT}\n"
    )
    node = cluster.node(1)
    return cluster.start_on_node(
        node,
        "compare-registry",
        ["docker-registry", "serve", str(cfg)],
        ready_url=f"http://127.0.0.1:{COMPARE_PORT}/v2/",
    )


def wait_mirror_hit(cluster: Cluster, target: str, timeout: float = 60.0) -> None:
    """Until node 1's agent serves `target` (a blob only node 2 holds) from its peer."""
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{ag.REGISTRY_PORT}{target}"
    while time.monotonic() < deadline:
        try:
            status, _, _ = nsexec.http_get(url, cluster.node(1).netns, timeout=5.0)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("node 1's agent never served node 2's blob")


def agent_phase(
    cluster: Cluster,
    plan: dict[str, Any],
    work: Path,
    name: str,
    extra: list[str],
    profile: str = "",
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """(Re)start both agents with `extra` flags, then run the plan against node 1's agent:
    its client result, usage, and what its log says about misses and peers; the usage series."""
    node1, node2 = cluster.node(1), cluster.node(2)
    for node in (node1, node2):
        if "agent" in node.processes:
            ag.stop_agent(cluster, node)
    marks = {node.name: len(ag.agent_log(node)) for node in (node1, node2)}
    ag.start_agents(cluster, extra=extra)
    for blob in plan["peer_blobs"]:
        wait_mirror_hit(cluster, f"{blob['path']}?ns={plan['ns']}")
    agent_pid = node1.processes["agent"].pid
    time.sleep(3)
    idle = usage(agent_pid)
    clients, duration = plan["clients"], plan["duration"]
    progress(f"{name}: agent idle {idle}; {clients} clients x {duration:.0f} s against the agent")
    profiler = None
    if profile:  # py-spy (not a project dependency) records the agent under load
        profiler = subprocess.Popen(
            ["py-spy", "record", "--pid", str(agent_pid), "--format", "raw", "--nonblocking",
             "--duration", str(int(duration)), "--output", profile],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    with Sampler(agent_pid) as sampler:
        agent_result = run_client(cluster, plan, work, name)
        if profiler is not None:
            profiler.wait(60)
    time.sleep(10)  # connections closed, buffers given back
    after = usage(agent_pid)
    time.sleep(20)
    after_30s = usage(agent_pid)
    peer_keys = {b["digest"] for b in plan["peer_blobs"]}
    logs = {node.name: log_since(node, marks[node.name]) for node in (node1, node2)}
    result: dict[str, Any] = {
        "agent_flags": extra,
        "agent": agent_result,
        "agent_usage": {
            "idle": idle,
            "peak": sampler.peak(),
            "after_10s": after,
            "after_30s": after_30s,
        },
        "agent_false_miss_reasons": miss_reasons(logs[node1.name], peer_keys),
        "agent_peer_trouble": peer_trouble(logs[node1.name]),
        "agent_warnings": {
            "node1": warnings(logs[node1.name]),
            "node2": warnings(logs[node2.name]),
        },
    }
    return result, sampler.series


def run(
    clients: int, duration: float, soak: bool, profile: str = "", compare_limit: int = 0
) -> dict[str, Any]:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # agents inherit it
    work = Path(tempfile.mkdtemp(prefix="spegla-bench-load-"))
    cluster = Cluster(work / "cluster", nodes=2)
    try:
        progress("cluster up (2 nodes)")
        cluster.up()
        local = build_large(work / "images", BLOB_MIB, name="load-local")
        peer = build_large(work / "images", BLOB_MIB, name="load-peer")
        for image in (local, peer):
            cluster.upstream.push(image)
        progress("agents (defaults)")
        ag.start_agents(cluster)
        node1, node2 = cluster.node(1), cluster.node(2)
        node1.pull(cluster.ref("load-local"))
        node2.pull(cluster.ref("load-peer"))
        local_blobs = blob_specs(local, "e2e/load-local")
        peer_blobs = blob_specs(peer, "e2e/load-peer")
        if {b["digest"] for b in local_blobs} & {b["digest"] for b in peer_blobs}:
            raise RuntimeError("the local and peer images share blobs")
        ns = cluster.upstream.host
        manifest = local.manifests[0].descriptor
        heads = [
            {"path": b["path"], "digest": b["digest"], "size": b["size"]} for b in local_blobs
        ] + [
            {
                "path": f"/v2/e2e/load-local/manifests/{manifest.digest}",
                "digest": manifest.digest,
                "size": manifest.size,
            }
        ]
        plan: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": ag.REGISTRY_PORT,
            "ns": ns,
            "local_blobs": local_blobs,
            "peer_blobs": peer_blobs,
            "head_targets": heads,
            "miss_prefix": "/v2/e2e/load-none",
            "weights": WEIGHTS,
            "clients": clients,
            "duration": duration,
        }
        default, series = agent_phase(cluster, plan, work, "agent", [], profile)
        result: dict[str, Any] = {
            "clients": clients,
            "duration_s": duration,
            "mix_weights": WEIGHTS,
            "blob_sizes": sorted(b["size"] for b in local_blobs + peer_blobs),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "cpus": os.cpu_count(),
            **default,
        }
        if soak:
            minute = min(60, len(series) // 3) or 1
            first, last = series[:minute], series[-minute:]

            def mean(xs: list[dict[str, float]], key: str) -> float:
                return round(sum(x[key] for x in xs) / max(1, len(xs)), 1)

            result["soak_drift"] = {
                "rss_mib_first_minute": mean(first, "rss_mib"),
                "rss_mib_last_minute": mean(last, "rss_mib"),
                "fds_first_minute": mean(first, "fds"),
                "fds_last_minute": mean(last, "fds"),
            }
            return result
        extra_runs: dict[str, Any] = {}
        if compare_limit >= 0:
            flags = ["--peer-upload-limit", str(compare_limit)]
            label = f"peer_upload_limit_{compare_limit}"
            extra_runs[label], _ = agent_phase(cluster, plan, work, label, flags)
        progress("docker-registry with the same plan")
        start_compare_registry(cluster, work)
        compare_plan = {**plan, "port": COMPARE_PORT, "ns": ""}
        registry_result = run_client(cluster, compare_plan, work, "registry")
        result["docker_registry"] = registry_result
        rate = max(registry_result["requests_per_s"], 1e-9)
        result["ratio_requests_per_s"] = round(default["agent"]["requests_per_s"] / rate, 3)
        for extra in extra_runs.values():
            extra["ratio_requests_per_s"] = round(extra["agent"]["requests_per_s"] / rate, 3)
        result["extra_runs"] = extra_runs
        return result
    finally:
        cluster.down()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per server")
    parser.add_argument("--soak", action="store_true", help="10 min against the agent only")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    parser.add_argument("--profile", default="", help="py-spy's collapsed stacks of the agent")
    parser.add_argument(
        "--compare-upload-limit",
        type=int,
        default=0,
        help="after the run with the agents' defaults, an extra labelled run with"
        " --peer-upload-limit set to this (default 0: no upload bound); -1 skips it",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 2000 or not 1 <= args.duration <= 3600:
        raise SystemExit("--clients must be 1..2000 and --duration 1..3600 s")
    missing = missing_requirements()
    if missing:
        raise SystemExit(f"bench.load: {missing}")
    duration = 600.0 if args.soak else args.duration
    result = run(args.clients, duration, args.soak, args.profile, args.compare_upload_limit)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
