"""Local blob throughput: a tiny app's zerocopysend on the generic ASGI server vs the registry.

Why: the transport is a generic ASGI server (`registry.http.server`); a local blob must leave
by sendfile as fast and as cheaply through it as the registry serves it.  Three servers, each
in its own process on loopback, serve the same file:

- `registry`: the registry app as `bench.blob` runs it (a directory-backed content store);
- `asgi_zerocopy`: a tiny ASGI app on `registry.http.server.serve_asgi` that answers with
  `http.response.zerocopysend` messages of `--slice-mib` each (as an app reporting progress);
- `docker_registry`: Debian's docker-registry with the same bytes (the usual reference).

curl downloads (1 stream, then 4 in parallel), the servers measured in alternation for
`--rounds` rounds; the JSON has each server's median and the ratios of the same run.

    python -m bench.asgi_server --size-mib 512 --rounds 5 --json
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
from pathlib import Path
from typing import Any

from bench.blob import (
    download,
    make_blob,
    measure,
    start_docker_registry,
    stop,
    wait_port,
)

ROOT = Path(__file__).resolve().parent.parent
STREAMS = ("1_stream", "4_streams")


# --- the servers, each run in its own process ----------------------------------------------------


def serve_zerocopy(args: argparse.Namespace) -> None:
    import trio

    from registry.http.server import serve_asgi

    path = args.blob_file
    size = os.path.getsize(path)
    piece = args.slice_mib << 20

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise RuntimeError("no lifespan")
        headers = [(b"content-length", str(size).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        with open(path, "rb") as file:  # noqa: ASYNC230 - a local open, as the registry's is
            sent = 0
            while sent < size:
                count = min(piece, size - sent)
                message = {"type": "http.response.zerocopysend", "file": file}
                more = sent + count < size
                await send({**message, "offset": sent, "count": count, "more_body": more})
                sent += count

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(functools.partial(serve_asgi, app, "127.0.0.1", 0))
            await trio.Path(args.port_file).write_text(str(port))

    trio.run(run)


# --- orchestration -------------------------------------------------------------------------------


def _start(mode: str, work: Path, blob: Path, digest: str, slice_mib: int) -> Any:
    """("registry": bench.blob's agent server; "zerocopy": this module's tiny app)."""
    port_file = work / f"{mode}.port"
    if mode == "registry":
        argv = [sys.executable, "-m", "bench.blob", "--serve-agent", "--port-file"]
    else:
        argv = [sys.executable, "-m", "bench.asgi_server", "--serve", mode]
        argv += ["--slice-mib", str(slice_mib), "--port-file"]
    argv += [str(port_file), "--blob-file", str(blob), "--digest", digest]
    proc = subprocess.Popen(argv, cwd=ROOT)
    return proc, wait_port(port_file, proc)


def _median(samples: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(s[key] for s in samples), 3) for key in samples[0]}


def _ratio(a: float, b: float) -> float:
    return round(a / max(b, 1e-9), 3)


def run(size_mib: int, rounds: int, slice_mib: int) -> dict[str, Any]:
    size = size_mib << 20
    work = Path(tempfile.mkdtemp(prefix="spegla-bench-asgi-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        shaped = work / "content" / "blobs" / "sha256"
        shaped.mkdir(parents=True)
        blob = shaped / "blob"
        digest = make_blob(blob, size)
        blob = blob.rename(shaped / digest.removeprefix("sha256:"))
        agent, agent_port = _start("registry", work, blob, digest, slice_mib)
        procs.append(agent)
        zero, zero_port = _start("zerocopy", work, blob, digest, slice_mib)
        procs.append(zero)
        registry, registry_url = start_docker_registry(work, blob, digest)
        procs.append(registry)
        servers = {
            "registry": (
                agent.pid,
                f"http://127.0.0.1:{agent_port}/v2/bench/blob/blobs/{digest}?ns=docker.io",
            ),
            "asgi_zerocopy": (zero.pid, f"http://127.0.0.1:{zero_port}/blob"),
            "docker_registry": (registry.pid, registry_url),
        }
        samples: dict[str, dict[str, list[dict[str, float]]]] = {
            name: {streams: [] for streams in STREAMS} for name in servers
        }
        for _, url in servers.values():
            download([url], size)  # warm-up: page cache, connections, lazy imports
        for _ in range(rounds):  # alternate, so a noisy moment hits every server alike
            for name, (pid, url) in servers.items():
                samples[name]["1_stream"].append(measure(pid, url, size, 1))
                samples[name]["4_streams"].append(measure(pid, url, size, 4))
        results: dict[str, Any] = {"size_mib": size_mib, "rounds": rounds, "slice_mib": slice_mib}
        for name in servers:
            results[name] = {streams: _median(samples[name][streams]) for streams in STREAMS}
        pairs = (
            ("asgi_zerocopy", "registry"),
            ("asgi_zerocopy", "docker_registry"),
            ("registry", "docker_registry"),
        )
        for a, b in pairs:
            results[f"ratios_{a}_over_{b}"] = {
                streams: {
                    key: _ratio(results[a][streams][field], results[b][streams][field])
                    for key, field in (("throughput", "mb_s"), ("cpu_per_gib", "cpu_s_per_gib"))
                }
                for streams in STREAMS
            }
        return results
    finally:
        for proc in procs:
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slice-mib", type=int, default=8, help="bytes per zerocopysend message")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    parser.add_argument("--serve", choices=["zerocopy"], help=argparse.SUPPRESS)
    parser.add_argument("--port-file", help=argparse.SUPPRESS)
    parser.add_argument("--blob-file", default="", help=argparse.SUPPRESS)
    parser.add_argument("--digest", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve == "zerocopy":
        serve_zerocopy(args)
        return
    if shutil.which("curl") is None or shutil.which("docker-registry") is None:
        raise SystemExit("bench.asgi_server needs curl and docker-registry (Debian packages)")
    if not (1 <= args.rounds <= 20 and 1 <= args.size_mib <= 8192 and 1 <= args.slice_mib <= 64):
        raise SystemExit("--rounds 1..20, --size-mib 1..8192, --slice-mib 1..64")
    result = run(args.size_mib, args.rounds, args.slice_mib)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
