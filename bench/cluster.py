"""Cluster pull benchmark: how much faster, and how much less upstream traffic, with spegla.

Why: the point of spegla is that the second and later nodes pull from peers instead of a slow
upstream.  This runs the harness cluster (real containerd per node, real docker-registry upstream
behind a tbf-limited link, CRI pulls) and measures, for each scenario, the pull times and the blob
bytes the upstream served, once with the real agents and once with 404 stand-ins (the baseline:
every node goes upstream).  In agents mode it also reports the agents' start-to-ready time, the
idle RSS/CPU of node 1's agent (3 s window before any pull) and every agent's RSS after the pulls.

Scenarios: ``rolling`` (node 1 pulls, then the others one after another) and ``burst`` (all nodes
at once).  Each (scenario, mode) runs on a fresh cluster, so nothing is cached.  Needs root.

  python -m bench.cluster --nodes 4 --size-mib 200 --rate-mbit 100 --json

Prints one JSON object on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tests.harness import agents as ag
from tests.harness.cluster import Cluster, PullResult
from tests.harness.fixtures import missing_requirements
from tests.harness.images import TestImages, build_test_set

MODES = ("baseline", "agents")
SCENARIOS = ("rolling", "burst")


def progress(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return math.nan
    s = sorted(values)
    k = max(1, math.ceil(p / 100 * len(s)))
    return s[k - 1]


def _pull_all_at_once(c: Cluster, ref: str) -> list[PullResult]:
    results: dict[int, PullResult | BaseException] = {}

    def pull(i: int) -> None:
        try:
            results[i] = c.node(i).pull(ref, timeout=900)
        except BaseException as e:
            results[i] = e

    threads = [threading.Thread(target=pull, args=(n.index,)) for n in c.nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = []
    for i in sorted(results):
        r = results[i]
        if isinstance(r, BaseException):
            raise RuntimeError(f"pull on n{i} failed: {r}")
        out.append(r)
    return out


def run_one(
    images: TestImages, nodes: int, rate_mbit: float | None, scenario: str, mode: str
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="spg-bench-"))
    c = Cluster(workdir, nodes=nodes)
    try:
        c.up(images=images)
        agent_stats: dict[str, Any] = {}
        if mode == "agents":
            agent_stats["ready_s"] = round(ag.start_agents(c), 3)
            agent_stats["idle_node1"] = ag.idle_usage(c.node(1), 3.0)
        else:
            c.start_standin_mirrors()
        if rate_mbit:
            c.limit_upstream(rate_mbit)
        ref = c.ref(images.large.name)
        mark = c.upstream.mark()
        t0 = time.monotonic()
        if scenario == "rolling":
            pulls = []
            for n in c.nodes:
                pulls.append(n.pull(ref, timeout=900))
                progress(f"{scenario}/{mode}: {n.name} pulled in {pulls[-1].seconds:.2f}s")
        else:
            pulls = _pull_all_at_once(c, ref)
            progress(f"{scenario}/{mode}: " + ", ".join(f"{p.seconds:.2f}s" for p in pulls))
        wall = time.monotonic() - t0
        times = [p.seconds for p in pulls]
        out: dict[str, Any] = {
            "pull_s": [round(t, 3) for t in times],
            "p50_s": round(statistics.median(times), 3),
            "p99_s": round(percentile(times, 99), 3),
            "wall_s": round(wall, 3),
            "upstream_blob_bytes": c.upstream.blob_bytes(mark),
            "upstream_blob_fetches": len(c.upstream.blob_fetches(mark)),
        }
        if mode == "agents":
            counts = [ag.mirror_counts(n) for n in c.nodes]
            out["mirror_hits"] = sum(h for h, _ in counts)
            out["mirror_misses"] = sum(m for _, m in counts)
            out["agent"] = agent_stats
            out["agent_rss_mb_after"] = [
                round(ag.process_stats(n.processes["agent"].pid)[0] / 1e6, 1) for n in c.nodes
            ]
        return out
    finally:
        c.down()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--size-mib", type=int, default=200)
    p.add_argument("--rate-mbit", type=float, default=100.0, help="0: no limit")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--json", action="store_true", help="print JSON only (the default output)")
    a = p.parse_args(argv)
    reason = missing_requirements()
    if reason:
        print(f"bench.cluster: {reason}", file=sys.stderr)
        return 2
    scenarios = [s for s in a.scenarios.split(",") if s]
    modes = [m for m in a.modes.split(",") if m]
    bad = [s for s in scenarios if s not in SCENARIOS] + [m for m in modes if m not in MODES]
    if bad or not 1 <= a.nodes <= 20 or a.size_mib < 1:
        print(f"bench.cluster: bad arguments {bad or ''}", file=sys.stderr)
        return 2
    rate = a.rate_mbit or None
    progress(f"building {a.size_mib} MiB image")
    images = build_test_set(Path(tempfile.mkdtemp(prefix="spg-bench-img-")), large_mib=a.size_mib)
    result: dict[str, Any] = {
        "nodes": a.nodes,
        "size_mib": a.size_mib,
        "rate_mbit": rate,
        "image_bytes": images.large.total_size,
        "scenarios": {},
    }
    for s in scenarios:
        for m in modes:
            progress(f"{s}/{m}: fresh {a.nodes}-node cluster")
            try:
                r = run_one(images, a.nodes, rate, s, m)
            except Exception as e:
                progress(f"{s}/{m}: FAILED: {e}")
                r = {"error": str(e).splitlines()[0][:300]}
            result["scenarios"].setdefault(s, {})[m] = r
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
