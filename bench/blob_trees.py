"""Blob serving, one checkout against another: alternating downloads from the same store.

Why: one `bench.blob` download is a single sample, and on a 2-core machine a loopback download
is bimodal (the same server is several times faster when the scheduler puts curl and the server
on different cores than on one), so two `bench.blob` runs can differ widely with no code change.
This bench serves the same blob from the same containerd content store with the agent of each
checkout, both running at once, and downloads from them in alternation (the order flips every
round) many times: the medians, the fastest samples (the different-cores mode) and the server
CPU per GiB compare the code, not the moment.  `--pin` puts both agents on one core and curl on
the other, so every sample is of the same mode.

    python -m bench.blob_trees --baseline ../old-checkout --size-mib 1024 --rounds 12 --json

Each checkout must have its own `.venv` and a `bench.blob --serve-agent` (the server process
`bench.blob` runs).  Without root (no containerd) both serve the blob from a directory shaped
like containerd's content directory.  Loopback only; the number of downloads is bounded.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.blob import GIB, cpu_seconds, download, make_blob, start_containerd, stop, wait_port

HERE = Path(__file__).resolve().parent.parent
MAX_ROUNDS = 100
SERVER_CPUS = {0}  # --pin: both agents on this core, curl on the other, one mode for all samples
CLIENT_CPUS = {1}


def start_agent(
    checkout: Path, work: Path, name: str, store_args: list[str], cpus: set[int] | None
) -> tuple[subprocess.Popen[bytes], int]:
    """The agent server of `checkout` (its own interpreter and code, on `cpus` if given) and its
    loopback port."""
    port_file = work / f"{name}.port"
    python = checkout / ".venv" / "bin" / "python"
    argv = [str(python), "-m", "bench.blob", "--serve-agent", "--port-file", str(port_file)]
    pin = None if cpus is None else functools.partial(os.sched_setaffinity, 0, cpus)
    proc = subprocess.Popen([*argv, *store_args], cwd=checkout, preexec_fn=pin)
    try:
        return proc, wait_port(port_file, proc)
    except BaseException:
        stop(proc)
        raise


def run(
    baseline: Path, candidate: Path, size_mib: int, rounds: int, streams: int, pin: bool
) -> dict[str, Any]:
    size = size_mib << 20
    work = Path(tempfile.mkdtemp(prefix="spegla-bench-trees-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, work, True)
        blob = work / "blob"
        digest = make_blob(blob, size)
        store_args = ["--digest", digest]
        if os.geteuid() == 0 and shutil.which("containerd") is not None:
            ctd, sock, content = start_containerd(work, blob, digest, size)
            stack.callback(ctd.remove)
            store_args += ["--containerd-sock", sock, "--content-path", content]
            agent_store = "containerd content store"
        else:
            shaped = work / "content" / "blobs" / "sha256"
            shaped.mkdir(parents=True)
            target = shaped / digest.removeprefix("sha256:")
            blob.rename(target)
            store_args += ["--blob-file", str(target)]
            agent_store = "directory shaped like containerd's content dir (not root)"
        agents: dict[str, subprocess.Popen[bytes]] = {}
        urls: dict[str, str] = {}
        for name, checkout in (("baseline", baseline), ("candidate", candidate)):
            agents[name], port = start_agent(
                checkout, work, name, store_args, SERVER_CPUS if pin else None
            )
            stack.callback(stop, agents[name])
            urls[name] = f"http://127.0.0.1:{port}/v2/bench/blob/blobs/{digest}?ns=docker.io"
        if pin:  # curl (started from here) runs on the other core
            mask = os.sched_getaffinity(0)
            os.sched_setaffinity(0, CLIENT_CPUS)
            stack.callback(os.sched_setaffinity, 0, mask)
        for url in urls.values():
            download([url], size)  # warm-up: page cache, connections, lazy imports
        walls: dict[str, list[float]] = {name: [] for name in agents}
        cpu = dict.fromkeys(agents, 0.0)
        for round_ in range(rounds):
            order = list(agents) if round_ % 2 == 0 else list(reversed(agents))
            for name in order:
                before = cpu_seconds(agents[name].pid)
                walls[name].append(download([urls[name]] * streams, size))
                cpu[name] += cpu_seconds(agents[name].pid) - before
    gib = rounds * streams * size / GIB
    result: dict[str, Any] = {
        "size_mib": size_mib,
        "rounds": rounds,
        "streams": streams,
        "agent_store": agent_store,
        "pinned": pin,
    }
    for name, checkout in (("baseline", baseline), ("candidate", candidate)):
        median = statistics.median(walls[name])
        result[name] = {
            "checkout": checkout.name,
            "median_mb_s": round(streams * size / median / 1e6, 1),
            "best_mb_s": round(streams * size / min(walls[name]) / 1e6, 1),
            "cpu_s_per_gib": round(cpu[name] / gib, 3),
            "walls_s": sorted(round(wall, 3) for wall in walls[name]),
        }
    result["ratios_candidate_over_baseline"] = {
        "throughput": round(
            statistics.median(walls["baseline"]) / statistics.median(walls["candidate"]), 3
        ),
        "best_throughput": round(min(walls["baseline"]) / min(walls["candidate"]), 3),
        "cpu_per_gib": round(cpu["candidate"] / max(cpu["baseline"], 1e-9), 3),
    }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--baseline", required=True, help="the other checkout (with a .venv)")
    parser.add_argument("--candidate", default=str(HERE), help="default: this checkout")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=12, help=f"downloads each (<= {MAX_ROUNDS})")
    parser.add_argument("--streams", type=int, default=1, help="parallel downloads per sample")
    parser.add_argument("--pin", action="store_true", help="agents on CPU 0, curl on CPU 1")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= MAX_ROUNDS or not 1 <= args.streams <= 16:
        raise SystemExit(f"--rounds must be 1..{MAX_ROUNDS} and --streams 1..16")
    if args.pin and not {*SERVER_CPUS, *CLIENT_CPUS} <= os.sched_getaffinity(0):
        raise SystemExit("--pin needs CPUs 0 and 1")
    if shutil.which("curl") is None:
        raise SystemExit("bench.blob_trees needs curl")
    baseline, candidate = Path(args.baseline).resolve(), Path(args.candidate).resolve()
    for checkout in (baseline, candidate):
        if not (checkout / ".venv" / "bin" / "python").exists():
            raise SystemExit(f"{checkout}: no .venv (run `make setup` there)")
    result = run(baseline, candidate, args.size_mib, args.rounds, args.streams, args.pin)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
