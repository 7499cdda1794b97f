"""A pull's time while one host floods the DHT with provider records, against quiet pulls.

Why: a flood of records from one source must not slow what honest nodes do; the DHT's
per-source rate limit and quotas bound what it costs.  This runs the harness cluster (real
containerd per node, agents as installed, a docker-registry upstream) with 3 nodes: node 1 holds
`--images` distinct images; node 2 pulls them one by one (served by node 1 through the mirror),
alternating a quiet pull with a pull during a flood.  The flood comes from the upstream namespace
(not a node): ADD_PROVIDER records of random keys with a valid token for its own IP, sent to
nodes 1 and 2 at `--rate` datagrams per second for as long as the pull runs (bounded by
`--max-datagrams` and the pull).  Needs root.

  python -m bench.record_flood --images 6 --rate 4000 --json

Prints one JSON object on stdout (quiet and flood pull times, their medians and the ratio
flood/quiet from the same run, datagrams sent); progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from dht import codec
from dht.codec import AddProvider, Ping, Pong
from dht.protocol import PONG_SIZE
from tests.harness import agents as ag
from tests.harness import nsexec
from tests.harness.cluster import Cluster
from tests.harness.fixtures import missing_requirements
from tests.harness.images import build_small


def progress(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _token(sock: socket.socket, target: tuple[str, int]) -> bytes:
    sock.sendto(codec.encode(codec.padded(Ping(1, os.urandom(32)), PONG_SIZE)), target)
    deadline = time.monotonic() + 1.0
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            msg = codec.decode(sock.recvfrom(2048)[0])
        except (OSError, codec.DecodeError):
            break
        if isinstance(msg, Pong):
            return msg.token
    return b""


def flood(targets: list[tuple[str, int]], rate: float, limit: int, stop: threading.Event) -> int:
    """Records of random keys to `targets` at `rate`/s until `stop` (at most `limit`); the count."""
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", 0))
        tokens = [_token(sock, t) for t in targets]
        sock.setblocking(False)
        started = time.monotonic()
        while not stop.is_set() and sent < limit:
            for target, token in zip(targets, tokens, strict=True):
                add = AddProvider(
                    sent & codec.MAX_TXID, os.urandom(32), os.urandom(32), 6666, 86400, token
                )
                try:
                    sock.sendto(codec.encode(add), target)
                except OSError:
                    pass  # a full send buffer: the same as a lost datagram
                sent += 1
            ahead = sent / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
            try:
                while sock.recv(2048):  # drop the acks
                    pass
            except OSError:
                pass
    return sent


def run(images: int, rate: float, limit: int) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="spg-bench-flood-"))
    c = Cluster(workdir, nodes=3)
    try:
        c.up(large_mib=1)
        ag.start_agents(c)
        n1, n2 = c.node(1), c.node(2)
        refs = []
        for i in range(images):
            img = build_small(workdir / "img", name=f"flood-{i}")
            refs.append(c.upstream.push(img))
            n1.pull(refs[-1], timeout=300)
        time.sleep(3.0)  # node 1's announces are paced: let its records spread first
        targets = [(n1.ip, ag.ROUTER_PORT), (n2.ip, ag.ROUTER_PORT)]
        quiet: list[float] = []
        flooded: list[float] = []
        sent = 0
        for i, ref in enumerate(refs):
            if i % 2 == 0:
                quiet.append(n2.pull(ref, timeout=300).seconds)
                progress(f"quiet pull {quiet[-1]:.3f}s")
                continue
            stop = threading.Event()
            box: dict[str, int] = {}

            def attack(stop: threading.Event = stop, box: dict[str, int] = box) -> None:
                box["sent"] = nsexec.call_in_netns(
                    c.topology.upstream, flood, targets, rate, limit, stop
                )

            thread = threading.Thread(target=attack)
            thread.start()
            try:
                time.sleep(1.0)  # the flood is under way before the pull starts
                flooded.append(n2.pull(ref, timeout=300).seconds)
            finally:
                stop.set()
                thread.join(60)
            sent += box.get("sent", 0)
            progress(f"pull during a flood {flooded[-1]:.3f}s ({box.get('sent', 0)} datagrams)")
        quiet_p50 = statistics.median(quiet)
        flood_p50 = statistics.median(flooded)
        return {
            "images": images,
            "flood_rate_per_s": rate,
            "flood_datagrams": sent,
            "quiet_pull_s": [round(t, 3) for t in quiet],
            "flood_pull_s": [round(t, 3) for t in flooded],
            "quiet_p50_s": round(quiet_p50, 3),
            "flood_p50_s": round(flood_p50, 3),
            "flood_over_quiet": round(flood_p50 / quiet_p50, 3),
            "records_held_node2": dht_records(n2),
            "load_avg_1m": os.getloadavg()[0],
        }
    finally:
        c.down()


def dht_records(node: Any) -> int:
    url = f"http://127.0.0.1:{ag.METRICS_PORT}/debug/web/stats"
    status, _, body = node.http_get(url, timeout=5.0)
    return int(json.loads(body)["stats"]["dht"]["records_held"]) if status == 200 else -1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.record_flood", description=__doc__.split("\n")[0]
    )
    p.add_argument("--images", type=int, default=6, help="pulls in all, half quiet, half flooded")
    p.add_argument("--rate", type=float, default=4000.0, help="flood datagrams per second")
    p.add_argument("--max-datagrams", type=int, default=200_000, help="per flooded pull")
    p.add_argument("--json", action="store_true", help="print JSON only (the default output)")
    args = p.parse_args(argv)
    if args.images < 2 or not 0 < args.rate <= 20_000 or args.max_datagrams < 1:
        p.error("need --images >= 2, 0 < --rate <= 20000 and --max-datagrams >= 1")
    missing = missing_requirements()
    if missing:
        print(json.dumps({"skipped": missing}))
        return 0
    print(json.dumps(run(args.images, args.rate, args.max_datagrams)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
