"""Several peers for one blob, on network namespaces whose providers' uplinks are shaped.

Why: a big layer from one peer is limited by that peer's uplink; with the blob fetched as ranges
from several providers at once, the requester should see close to the sum of their uplinks.  Four
namespaces on one bridge (the harness topology, `tests.harness.netns`): node 1 runs an agent
(the registry app; its lookup names the providers), nodes 2-4 run registries holding the blobs,
each with its egress shaped by tbf to `--rate-mbit`.  curl in node 1 pulls one blob whose lookup
names one provider and another (same size) whose lookup names all three; the figure is the ratio
of the two throughputs (target: >= 2.5, docs/decisions/multi-peer-fetch.md).  Needs root.

    python -m bench.multipeer --size-mib 96 --rate-mbit 200 --json
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.blob import make_blob, stop, wait_port
from tests.harness import netns

PROVIDERS = (2, 3, 4)


def in_ns(ns: str, *cmd: str, cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], cwd=cwd)


def pull(ns: str, url: str, size: int) -> float:
    """curl `url` inside `ns`; wall seconds (raises unless the body had `size` bytes)."""
    start = time.monotonic()
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "curl", "-s", "-f", "-o", "/dev/null", "-w",
         "%{size_download}", url],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    wall = time.monotonic() - start
    if out.returncode != 0 or int(float(out.stdout or 0)) != size:
        raise RuntimeError(f"pull failed: rc={out.returncode} got={out.stdout!r}")
    return wall


def run(size_mib: int, rate_mbit: float) -> dict[str, Any]:
    size = size_mib << 20
    root = Path(__file__).resolve().parent.parent
    work = Path(tempfile.mkdtemp(prefix="spegla-bench-multipeer-"))
    topology = netns.Topology(f"mp{secrets.token_hex(2)}", nodes=4)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        netns.create(topology)
        one, three = work / "one", work / "three"
        one_digest, three_digest = make_blob(one, size), make_blob(three, size)
        addresses = []
        for i in PROVIDERS:
            port_file = work / f"peer{i}.port"
            proc = in_ns(
                topology.node(i),
                sys.executable, "-m", "bench.mirror", "--serve", "peer", "--host", "0.0.0.0",
                "--port-file", str(port_file), "--files", str(one), str(three),
                cwd=root,
            )  # fmt: skip
            procs.append(proc)
            addresses.append(f"{netns.node_ip(i)}:{wait_port(port_file, proc)}")
            netns.limit_rate(topology.node(i), rate_mbit)

        def agent(digest: str, peers: list[str], name: str) -> int:
            port_file = work / f"agent-{name}.port"
            proc = in_ns(
                topology.node(1),
                sys.executable, "-m", "bench.mirror", "--serve", "agent",
                "--port-file", str(port_file), "--peers", *peers, "--digests", digest,
                cwd=root,
            )  # fmt: skip
            procs.append(proc)
            return wait_port(port_file, proc)

        single = agent(one_digest, addresses[:1], "one")
        multi = agent(three_digest, addresses, "three")

        def url(port: int, digest: str) -> str:
            return f"http://127.0.0.1:{port}/v2/bench/blob/blobs/{digest}?ns=docker.io"

        one_s = pull(topology.node(1), url(single, one_digest), size)
        three_s = pull(topology.node(1), url(multi, three_digest), size)
        return {
            "size_mib": size_mib,
            "provider_rate_mbit": rate_mbit,
            "one_provider": {"s": round(one_s, 3), "mb_s": round(size / one_s / 1e6, 1)},
            "three_providers": {"s": round(three_s, 3), "mb_s": round(size / three_s / 1e6, 1)},
            # target: >= 2.5
            "ratio_three_over_one": round(one_s / three_s, 3),
        }
    finally:
        for proc in procs:
            stop(proc)
        netns.destroy(topology.all_namespaces)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=96)
    parser.add_argument("--rate-mbit", type=float, default=200.0)
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args(argv)
    result = run(args.size_mib, args.rate_mbit)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
