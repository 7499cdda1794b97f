"""Per-request cost of small answers: the registry app on our h11 server, one process.

Why: under `bench.load` most requests are small (HEADs, manifests, 404s) and their cost is the
app's and the server's per-request work, which the load run's noise hides.  Here one keep-alive
client (h11, in the same process) sends each kind of request in sequence to the registry on
loopback, with a file-backed store; the JSON has microseconds per request (client included),
the median of `--rounds` rounds.

    python -m bench.small_requests --json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path

import h11
import trio

from registry.serve.app import Registry, RegistrySettings
from registry.serve.server import run_registry
from tests.fakes import MemoryContentStore, MemoryNetwork, MemoryRouter
from tests.registry.conftest import LOOPBACK, fill

WARM_UP = 200


async def ask(stream: trio.SocketStream, conn: h11.Connection, method: str, target: str) -> None:
    request = h11.Request(method=method, target=target, headers=[("Host", "bench")])
    await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(1 << 20))
        elif isinstance(event, h11.EndOfMessage):
            conn.start_next_cycle()
            return


async def measure(requests: int, rounds: int, files: Path) -> dict[str, float]:
    store = MemoryContentStore()
    content = fill(store, files=files)
    registry = Registry(store, MemoryRouter(MemoryNetwork()), RegistrySettings())
    repo = "/v2/library/app"
    kinds = {
        "head_blob_us": ("HEAD", f"{repo}/blobs/{content.layer}?ns=docker.io"),
        "get_manifest_us": ("GET", f"{repo}/manifests/{content.manifest}?ns=docker.io"),
        "malformed_us": ("GET", f"{repo}/blobs/sha256:bad?ns=docker.io"),
        "readyz_us": ("GET", "/readyz"),
    }
    samples: dict[str, list[float]] = {name: [] for name in kinds}
    async with trio.open_nursery() as nursery:
        port = await nursery.start(functools.partial(run_registry, registry, LOOPBACK, 0))
        for _ in range(rounds):
            for name, (method, target) in kinds.items():
                stream = await trio.open_tcp_stream(LOOPBACK, port)
                conn = h11.Connection(h11.CLIENT)
                async with stream:
                    for _ in range(WARM_UP):
                        await ask(stream, conn, method, target)
                    started = time.perf_counter()
                    for _ in range(requests):
                        await ask(stream, conn, method, target)
                    samples[name].append((time.perf_counter() - started) / requests * 1e6)
        nursery.cancel_scope.cancel()
    return {name: round(statistics.median(values), 1) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="per kind and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args()
    requests = max(1, min(args.requests, 100_000))  # bounded: one client, in sequence
    rounds = max(1, min(args.rounds, 20))
    with tempfile.TemporaryDirectory(prefix="spegla-small-") as files:
        result = trio.run(measure, requests, rounds, Path(files))
    output = {"requests": requests, "rounds": rounds, **result}
    if not args.json:
        print("microseconds per request, client included (median of rounds):")
    print(json.dumps(output))


if __name__ == "__main__":
    main()
