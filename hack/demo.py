"""``make demo``: three nodes, real containerd and real spegla agents; watch pulls come from peers.

Why: the quickest way to see what spegla does.  It brings up the harness cluster (network
namespaces, one containerd and one ``spegla registry`` per node, a docker-registry upstream behind
a rate-limited link), pulls an image on node 1 (from upstream), then on nodes 2 and 3, and reports
where each blob came from (upstream or which peer), the pull times and the agents' hit/miss
counters.  Per-blob peer attribution comes from the pulling agent's INFO mirror lines.
Then a burst: a second image, pulled by every node at the same moment; the report shows how many
copies the upstream served (one: each layer was claimed by one node, whose containerd fetched
it upstream) and, per blob, who streamed it from whom while it was still arriving.
Everything is torn down at the end (``--keep`` leaves it up for ``hack/cluster``).
Needs root.

  python -m hack.demo [--nodes 3] [--size-mib 64] [--rate-mbit 100] [--keep] [--no-burst]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tests.harness import agents as ag
from tests.harness.cluster import Cluster, Node
from tests.harness.fixtures import missing_requirements
from tests.harness.images import BuiltImage, build_large, build_test_set


def step(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def serve_counts(c: Cluster) -> dict[str, int]:
    return {n.name: ag.peer_serves(n) for n in c.nodes}


def mirror_hits(node: Node, mark: int) -> dict[str, list[dict[str, Any]]]:
    """The agent's INFO mirror lines for blobs it got from peers (after record ``mark``), by key."""
    out: dict[str, list[dict[str, Any]]] = {}
    for rec in ag.agent_log(node)[mark:]:
        if rec.get("cache") == "hit" and rec.get("method", "GET") == "GET" and rec.get("peer"):
            out.setdefault(str(rec.get("key")), []).append(rec)
    return out


def _peer_names(c: Cluster, addresses: list[str]) -> str:
    by_ip = {n.ip: n.name for n in c.nodes}
    names = [by_ip.get(a.rsplit(":", 1)[0], a) for a in addresses]
    return "+".join(dict.fromkeys(names))


def served_from_access_lines(c: Cluster, digest: str, node: Node) -> list[str]:
    """Nodes whose agent wrote a DEBUG access line for ``digest`` requested by ``node``'s IP
    (only when the agents run with ``--log-level DEBUG``)."""
    return [
        n.name
        for n in c.nodes
        if n is not node
        and any(
            rec.get("ip") == node.ip and digest in str(rec.get("path", ""))
            for rec in ag.agent_log(n)
        )
    ]


def blob_sources(
    c: Cluster,
    node: Node,
    image: BuiltImage,
    mark: int,
    log_mark: int,
    served: dict[str, int],
) -> list[tuple[str, str]]:
    """(digest, where it came from) for every blob ``node`` needed for ``image``.

    Upstream: the registry's access log names the node.  Peers: the pulling agent's INFO mirror
    line for the blob names the peer that served it (``+``: a broken stream resumed from another).
    Without such a line: the peers' DEBUG access lines if any, else the peers whose agents served
    requests during this pull (``served``: node name -> requests, from their metrics), marked
    "(inferred)"."""
    upstream = {r.blob_digest for r in c.upstream.blob_fetches(mark) if r.remote_ip == node.ip}
    hits = mirror_hits(node, log_mark)
    during = "|".join(name for name, k in served.items() if k > 0 and name != node.name)
    out = []
    for digest in image.blob_digests():
        if digest in upstream:
            out.append((digest, "upstream"))
            continue
        lines = hits.get(digest)
        if lines:
            line = max(lines, key=lambda rec: int(rec.get("bytes") or 0))
            names = _peer_names(c, [str(line["peer"]), *line.get("resumed_from", [])])
            size = int(line.get("bytes") or 0)
            amount = f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size:,} B"
            ms = float(line.get("duration_ms") or 0.0)
            out.append((digest, f"peer {names}  ({amount} in {ms:.0f} ms)"))
            continue
        named = ",".join(served_from_access_lines(c, digest, node)) or during or "?"
        out.append((digest, f"peer {named} (inferred)"))  # "n1|n2": one of these
    return out


def run(a: argparse.Namespace) -> int:
    t_start = time.monotonic()
    step(f"building test images ({a.size_mib} MiB image e2e/big)")
    images = build_test_set(Path(tempfile.mkdtemp(prefix="spg-demo-img-")), large_mib=a.size_mib)
    workdir = Path(tempfile.gettempdir()) / "spegla-cluster" if a.keep else None
    if workdir is not None and (workdir / "state.json").exists():
        step(f"a cluster is already up in {workdir}: run `hack/cluster down` first")
        return 1
    workdir = workdir or Path(tempfile.mkdtemp(prefix="spg-demo-"))
    c = Cluster(workdir, nodes=a.nodes, tag="c" if a.keep else None, persistent=a.keep)
    try:
        step(f"bringing up {a.nodes} node namespaces, upstream registry and containerd per node")
        c.up(images=images)
        if a.rate_mbit:
            c.limit_upstream(a.rate_mbit)
            step(f"upstream link limited to {a.rate_mbit:g} Mbit/s (tbf)")
        step("starting spegla agents (static bootstrap), waiting for /readyz")
        ready_s = ag.start_agents(c)
        step(f"agents ready in {ready_s:.2f}s")
        c.save()
        ref = c.ref(images.large.name)
        rows = []
        for node in c.nodes:
            mark = c.upstream.mark()
            log_mark = len(ag.agent_log(node))
            before = serve_counts(c)
            step(f"{node.name} ({node.ip}): CRI pull {ref}")
            r = node.pull(ref, timeout=900)
            after = serve_counts(c)
            served = {k: after[k] - before[k] for k in after}
            sources = blob_sources(c, node, images.large, mark, log_mark, served)
            n_up = sum(1 for _, s in sources if s == "upstream")
            step(f"{node.name}: pulled in {r.seconds:.2f}s; {n_up}/{len(sources)} blobs upstream")
            rows.append((node, r.seconds, sources, c.upstream.blob_bytes(mark), served))
        print()
        mib = images.large.total_size / 2**20
        link = f", upstream {a.rate_mbit:g} Mbit/s" if a.rate_mbit else ""
        print(f"spegla demo: {a.nodes} nodes, image {ref} ({mib:.0f} MiB{link})")
        for node, seconds, sources, up_bytes, served in rows:
            peers = ", ".join(f"{k} {v} req" for k, v in served.items() if v > 0 and k != node.name)
            print(f"  {node.name}  pull {seconds:6.2f}s  upstream blob bytes {up_bytes:>11,}"
                  f"  served by peers: {peers or '-'}")  # fmt: skip
            for digest, src in sources:
                print(f"      {_short(digest)}  {src}")
        print("  agent counters (spegel_mirror_requests_total):")
        for node in c.nodes:
            hits, misses = ag.mirror_counts(node)
            print(f"      {node.name}  hit {hits:3d}  miss {misses:3d}")
        if not a.no_burst:
            burst(c, a)
        print(f"  total {time.monotonic() - t_start:.1f}s")
        if a.keep:
            print(f"  cluster left up in {workdir}: `hack/cluster status`, `hack/cluster down`")
        return 0
    except BaseException:
        if not a.keep:
            saved = save_logs(c)
            step(f"failed; logs of every node kept in {saved}")
        raise
    finally:
        if not a.keep:
            step("tearing down")
            c.down()


def burst(c: Cluster, a: argparse.Namespace) -> None:
    """Every node pulls a new image at the same moment; report upstream copies and who streamed
    what from whom while it was still arriving (the pulling agents' INFO mirror lines)."""
    img = build_large(Path(tempfile.mkdtemp(prefix="spg-demo-burst-")), a.size_mib, name="burst")
    ref = c.upstream.push(img)
    step(f"burst: all {len(c.nodes)} nodes pull {ref} at the same moment")
    mark = c.upstream.mark()
    log_marks = {n.name: len(ag.agent_log(n)) for n in c.nodes}
    results: dict[str, float | BaseException] = {}
    start = threading.Barrier(len(c.nodes))

    def pull(n: Node) -> None:
        start.wait()
        try:
            results[n.name] = n.pull(ref, timeout=900).seconds
        except BaseException as e:
            results[n.name] = e

    threads = [threading.Thread(target=pull, args=(n,)) for n in c.nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    up_bytes = c.upstream.blob_bytes(mark)
    by_ip = {n.ip: n.name for n in c.nodes}
    fetched_by: dict[str, list[str]] = {}
    for r in c.upstream.blob_fetches(mark):
        fetched_by.setdefault(r.blob_digest or "", []).append(by_ip.get(r.remote_ip, r.remote_ip))
    print()
    print(f"burst: {len(c.nodes)} nodes pull {ref} ({img.total_size / 2**20:.0f} MiB) at once")
    print(
        f"  upstream blob bytes {up_bytes:,} = {up_bytes / img.total_size:.2f} copies of the image"
    )
    for n in c.nodes:
        r = results.get(n.name)
        took = f"{r:6.2f}s" if isinstance(r, float) else f"FAILED ({r})"
        print(f"  {n.name}  pull {took}")
        lines = {}
        for rec in ag.agent_log(n)[log_marks[n.name] :]:
            if rec.get("cache") == "hit" and rec.get("peer") and rec.get("method", "GET") == "GET":
                lines[str(rec.get("key"))] = rec
        config = img.for_platform().config.digest
        for digest in img.blob_digests():
            if n.name in fetched_by.get(digest, []):
                why = "image config: tiny, never claimed" if digest == config else "claimed it"
                print(f"      {_short(digest)}  upstream ({why})")
                continue
            rec = lines.get(digest)
            if rec is None:
                print(f"      {_short(digest)}  ?")
                continue
            peer = _peer_names(c, [str(rec["peer"]), *rec.get("resumed_from", [])])
            size = int(rec.get("bytes") or 0)
            inflight = rec.get("provider_state") == "inflight"
            when = "while it was still arriving" if inflight else "complete"
            amount = f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size:,} B"
            ms = float(rec.get("duration_ms") or 0.0)
            print(f"      {_short(digest)}  peer {peer}, {when}  ({amount} in {ms:.0f} ms)")


def save_logs(c: Cluster) -> Path:
    """Copy the agents', containerds' and upstream's logs out before teardown removes them."""
    dest = Path(tempfile.mkdtemp(prefix="spg-demo-logs-"))
    for log in c.workdir.glob("**/*.log"):
        target = dest / log.relative_to(c.workdir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, target)
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hack.demo", description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--size-mib", type=int, default=64)
    p.add_argument("--rate-mbit", type=float, default=100.0, help="0: no limit")
    p.add_argument("--keep", action="store_true", help="leave the cluster up afterwards")
    p.add_argument("--no-burst", action="store_true", help="skip the all-at-once pull")
    a = p.parse_args(argv)
    reason = missing_requirements()
    if reason:
        print(f"demo: {reason}", file=sys.stderr)
        return 2
    if not 2 <= a.nodes <= 10 or a.size_mib < 1:
        print("demo: --nodes must be 2..10 and --size-mib >= 1", file=sys.stderr)
        return 2
    try:
        return run(a)
    except Exception as e:
        print(f"demo: failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
