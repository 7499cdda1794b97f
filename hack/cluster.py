"""``hack/cluster``: bring the test harness's multi-node cluster up by hand, use it, tear it down.

Why: the same code the e2e tests use (tests/harness/cluster.py), driven from a shell, so a developer
can look at a real cluster: N node namespaces with containerd each, an upstream registry with the
test images, and a mirror on every node's 127.0.0.1:5000.  State lives in a state dir, so each
command can run in its own process.  Needs root.

  python -m hack.cluster up 3 [--rate-mbit 100] [--large-mib 200] [--mirror standin|agent|none]
                               [--containerd ctrd1.6|ctrd2.2]
  python -m hack.cluster pull 2 small          # node index (or n2); test image name or full ref
  python -m hack.cluster status
  python -m hack.cluster logs 2 [agent|containerd|mirror|upstream] [-n 40]
  python -m hack.cluster down [--all]          # --all: see below

``down --all`` also stops everything the harness recorded in any process (clusters, registries,
containerds, agents: also those of a test run still going) and deletes every ``spg-`` namespace:
the clean-up after a killed test run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tests.harness import cluster as hc
from tests.harness.containerd import LINES, line_by_id
from tests.harness.fixtures import missing_requirements
from tests.harness.procs import is_alive


def default_state_dir() -> Path:
    return Path(tempfile.gettempdir()) / "spegla-cluster"


def _load(state_dir: Path) -> hc.Cluster:
    if not (state_dir / "state.json").exists():
        sys.exit(f"cluster: no cluster in {state_dir} (run `hack/cluster up N` first)")
    return hc.Cluster.load(state_dir)


def _node(c: hc.Cluster, spec: str) -> hc.Node:
    i = int(spec.removeprefix("n")) if spec.removeprefix("n").isdigit() else 0
    if not 1 <= i <= len(c.nodes):
        sys.exit(f"cluster: no node {spec!r} (nodes are 1..{len(c.nodes)})")
    return c.node(i)


def cmd_up(a: argparse.Namespace) -> int:
    if (a.state_dir / "state.json").exists():
        sys.exit(f"cluster: already up in {a.state_dir}; run `hack/cluster down` first")
    tag = "c" if a.state_dir == default_state_dir() else None  # others: a random tag
    line = line_by_id(a.containerd)
    if line.missing():
        sys.exit(f"cluster: {line.missing()}")
    c = hc.Cluster(
        a.state_dir, nodes=a.nodes, rate_mbit=a.rate_mbit, tag=tag, persistent=True, line=line
    )
    print(f"cluster: bringing up {a.nodes} nodes in {a.state_dir}", file=sys.stderr)
    c.up(large_mib=a.large_mib)
    if a.mirror == "standin":
        c.start_standin_mirrors()
    elif a.mirror == "agent":
        from tests.harness.agents import start_agents  # the agent's own dependencies

        start_agents(c)
    c.save()
    cmd_status(a)
    return 0


def cmd_pull(a: argparse.Namespace) -> int:
    c = _load(a.state_dir)
    node = _node(c, a.node)
    image = a.image if "/" in a.image else c.ref(a.image)
    mark = c.upstream.mark()
    r = node.pull(image)
    fetched = [x for x in c.upstream.blob_fetches(mark) if x.remote_ip == node.ip]
    print(json.dumps({"node": node.name, "image": image, "image_id": r.image_id,
                      "seconds": round(r.seconds, 3), "upstream_blob_fetches": len(fetched),
                      "upstream_blob_bytes": sum(x.bytes for x in fetched)}))  # fmt: skip
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    path = a.state_dir / "state.json"
    if not path.exists():
        print("cluster: down")
        return 0
    st = json.loads(path.read_text())
    print(f"cluster {st['tag']}: {st['nodes']} nodes ({st.get('containerd_line', 'ctrd1.6')}), "
          f"upstream {hc.UPSTREAM_HOST}"
          f"{', rate ' + str(st['rate_mbit']) + ' Mbit/s' if st['rate_mbit'] else ''}")  # fmt: skip
    for d in st["daemons"]:
        state = "running" if is_alive(d["pid"], d.get("start_time")) else "EXITED"
        node = d["node"] or "-"
        print(f"  node {node:>2}  {d['role']:<11} pid {d['pid']:<7} {state}  log {d['log']}")
    for name, ref in st["images"].items():
        print(f"  image {name:<7} {ref}")
    return 0


def cmd_logs(a: argparse.Namespace) -> int:
    c = _load(a.state_dir)
    path: Path | None = None
    if a.what == "upstream":
        path = c.upstream.log_path
    else:
        node = _node(c, a.node)
        d = node.processes.get(a.what)
        path = node.containerd.log_path if a.what == "containerd" else (d.log_path if d else None)
    if path is None:
        sys.exit(f"cluster: no {a.what} on node {a.node}")
    lines = path.read_text(errors="replace").splitlines()
    kept = [ln for ln in lines if '"hpack' not in ln]  # grpclib's h2 debug noise
    print("\n".join(kept[-a.n :]))
    return 0


def cmd_down(a: argparse.Namespace) -> int:
    report: list[str] = []
    if (a.state_dir / "state.json").exists():
        report += hc.Cluster.load(a.state_dir).down()
        report.append(f"cluster in {a.state_dir} removed")
    if a.all:
        report += hc.teardown_leftovers()
    for line in report or ["cluster: nothing to tear down"]:
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hack/cluster", description=__doc__.splitlines()[0])
    p.add_argument("--state-dir", type=Path, default=default_state_dir())
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="create N node namespaces, upstream, containerd per node")
    up.add_argument("nodes", type=int)
    up.add_argument("--rate-mbit", type=float, default=None, help="tbf limit on the upstream link")
    up.add_argument("--large-mib", type=int, default=4, help="size of the e2e/big image")
    up.add_argument("--mirror", choices=("standin", "agent", "none"), default="standin")
    up.add_argument(
        "--containerd",
        choices=[line.id for line in LINES],
        default=LINES[0].id,
        help="the containerd line every node runs (2.x: ../shared/containerd/)",
    )
    pull = sub.add_parser("pull", help="CRI pull on one node")
    pull.add_argument("node")
    pull.add_argument("image")
    sub.add_parser("status")
    logs = sub.add_parser("logs", help="tail of a node's agent/containerd/mirror log")
    logs.add_argument("node")
    logs.add_argument("what", nargs="?", default="agent",
                      choices=("agent", "containerd", "mirror", "upstream"))  # fmt: skip
    logs.add_argument("-n", type=int, default=40)
    down = sub.add_parser("down")
    down.add_argument("--all", action="store_true", help="also what other harness runs left")
    a = p.parse_args(argv)
    reason = missing_requirements()
    if reason:
        print(f"cluster: {reason}", file=sys.stderr)
        return 2
    return int(
        {"up": cmd_up, "pull": cmd_pull, "status": cmd_status, "logs": cmd_logs, "down": cmd_down}[
            a.cmd
        ](a)
    )


if __name__ == "__main__":
    sys.exit(main())
