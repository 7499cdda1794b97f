"""The mirror path: throughput client -> agent -> peer agent, and hit/miss latencies.

Why: a pull on a node that lacks a layer goes through its agent to a peer; that path must move
>= 1 GB/s, answer hits fast, and answer misses within the resolve deadlines (20 ms x 3) or at
once when the lookup converges empty.

Two registry processes on loopback: the *peer* holds the blobs (file-backed, zero-copy path);
the *agent* holds nothing and its router knows the peer for the bench digests.  Keys starting
`sha256:f` make the agent's lookup stay silent (never converge), other unknown keys converge
empty at once.  Latencies are measured by a keep-alive h11 client in this process.

    python -m bench.mirror --json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from bench.blob import cpu_seconds, download, make_blob, stop, wait_port

GIB = 1 << 30
SILENT = "sha256:f"


class BenchRouter:
    """Static providers; keys starting `sha256:f` never converge, others converge at once."""

    def __init__(self, providers: dict[str, list[Any]]) -> None:
        self.providers = providers

    def ready(self) -> bool:
        return True

    async def advertise(self, keys: Any) -> None:
        return None

    async def withdraw(self, keys: Any) -> None:
        return None

    @asynccontextmanager
    async def resolve(self, key: str) -> AsyncIterator[AsyncIterator[Any]]:
        yield self._lookup(key)

    async def _lookup(self, key: str) -> AsyncIterator[Any]:
        import trio

        for peer in self.providers.get(key, []):
            yield peer
        if key.startswith(SILENT):
            await trio.sleep_forever()


def serve(args: argparse.Namespace) -> None:
    import trio

    from registry.app import create_app
    from registry.interfaces import Peer, Router
    from registry.server import serve_registry
    from tests.fakes import MemoryContentStore, MemoryRouter

    store = MemoryContentStore()
    router: Router
    if args.serve == "peer":
        for path in args.files:
            store.add_file(path)
        router = MemoryRouter()
    else:
        peer = Peer(node_id=b"\x01" * 32, host="127.0.0.1", port=args.peer_port)
        router = BenchRouter({digest: [peer] for digest in args.digests})

    async def run() -> None:
        app = create_app(store, router)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(functools.partial(serve_registry, app, "127.0.0.1", 0))
            await trio.Path(args.port_file).write_text(str(port))

    trio.run(run)


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3),
        "max_ms": round(ordered[-1] * 1000, 3),
    }


def latencies(port: int, target: str, count: int, expect: int) -> dict[str, float]:
    import trio

    from registry.peer_client import PeerClient

    async def run() -> list[float]:
        client = PeerClient()
        samples = []
        for _ in range(count + 5):
            start = time.perf_counter()
            async with client.request("127.0.0.1", port, "GET", target) as response:
                while await response.receive() is not None:
                    pass
                status = response.status
            samples.append(time.perf_counter() - start)
            if status != expect:
                raise RuntimeError(f"{target}: status {status}, expected {expect}")
        await client.aclose()
        return samples[5:]  # the first few warm connections and imports

    return percentiles(trio.run(run))


def run(size_mib: int) -> dict[str, Any]:
    size = size_mib << 20
    work = Path(tempfile.mkdtemp(prefix="spegla-bench-mirror-"))
    procs: list[subprocess.Popen[bytes]] = []
    root = Path(__file__).resolve().parent.parent
    try:
        big, small = work / "big", work / "small"
        big_digest = make_blob(big, size)
        small_digest = make_blob(small, 4096)
        peer_port_file, agent_port_file = work / "peer.port", work / "agent.port"
        peer = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.mirror",
                "--serve",
                "peer",
                "--port-file",
                str(peer_port_file),
                "--files",
                str(big),
                str(small),
            ],
            cwd=root,
        )
        procs.append(peer)
        peer_port = wait_port(peer_port_file, peer)
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.mirror",
                "--serve",
                "agent",
                "--port-file",
                str(agent_port_file),
                "--peer-port",
                str(peer_port),
                "--digests",
                big_digest,
                small_digest,
            ],
            cwd=root,
        )
        procs.append(agent)
        agent_port = wait_port(agent_port_file, agent)

        def url(port: int, digest: str) -> str:
            return f"http://127.0.0.1:{port}/v2/bench/blob/blobs/{digest}?ns=docker.io"

        download([url(peer_port, big_digest)], size)  # warm-up
        download([url(agent_port, big_digest)], size)
        direct_wall = download([url(peer_port, big_digest)], size)
        before = cpu_seconds(agent.pid)
        mirrored_wall = download([url(agent_port, big_digest)], size)
        agent_cpu = cpu_seconds(agent.pid) - before
        unknown = "sha256:" + "0" * 64
        silent = SILENT + "f" * 63
        return {
            "size_mib": size_mib,
            "proxied": {
                "mb_s": round(size / mirrored_wall / 1e6, 1),
                "agent_cpu_s_per_gib": round(agent_cpu / (size / GIB), 3),
            },
            "direct_from_peer_mb_s": round(size / direct_wall / 1e6, 1),
            "hit_4kib_blob": latencies(
                agent_port, f"/v2/bench/blob/blobs/{small_digest}?ns=docker.io", 300, 200
            ),
            "miss_converged_empty": latencies(
                agent_port, f"/v2/bench/blob/blobs/{unknown}?ns=docker.io", 300, 404
            ),
            "miss_silent_lookup": latencies(
                agent_port, f"/v2/bench/blob/blobs/{silent}?ns=docker.io", 60, 404
            ),
        }
    finally:
        for proc in procs:
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    parser.add_argument("--serve", choices=["peer", "agent"], help=argparse.SUPPRESS)
    parser.add_argument("--port-file", help=argparse.SUPPRESS)
    parser.add_argument("--files", nargs="*", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--peer-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--digests", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args)
        return
    if shutil.which("curl") is None:
        raise SystemExit("bench.mirror needs curl")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    result = run(args.size_mib)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
