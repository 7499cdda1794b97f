"""Local blob throughput: the generic ASGI server's zerocopysend vs the registry's front door.

Why: the transport became a generic ASGI server (`registry.http.server`); a local blob must
still leave by sendfile as fast and as cheaply as through the front door that knew the
registry.  Three servers, each in its own process on loopback, serve the same file:

- `front_door`: the registry app behind `registry.serve.server.serve_registry` (a blob in a
  directory-backed content store, sent by the front door's sendfile);
- `asgi_zerocopy`: a tiny ASGI app on `registry.http.server.serve_asgi` that answers with
  `http.response.zerocopysend` messages of `--slice-mib` each (as an app reporting progress);
- `docker_registry`: Debian's docker-registry with the same bytes (the usual reference).

curl downloads (1 stream, then 4 in parallel), the servers measured in alternation for
`--rounds` rounds; the JSON has each server's median and the ratios of the same run.

Small requests (`small_requests`): the same registry app answers `GET /v2/` (a Quart route)
behind the front door and behind `serve_asgi` (wrapped in `hold_disconnect`, as the registry
runs it), `--clients` keep-alive connections for `--seconds` per server and round: requests/s
and server CPU per thousand requests.

    python -m bench.asgi_server --size-mib 512 --rounds 3 --json
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
from pathlib import Path
from typing import Any

from bench.blob import (
    cpu_seconds,
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


def serve_front_door(args: argparse.Namespace) -> None:
    import trio

    from registry.serve.app import create_app
    from registry.serve.server import serve_registry
    from tests.fakes import MemoryContentStore, MemoryRouter

    async def run() -> None:
        store = MemoryContentStore()
        store.add_file(args.blob_file, digest=args.digest)
        app = create_app(store, MemoryRouter())
        async with trio.open_nursery() as nursery:
            port = await nursery.start(functools.partial(serve_registry, app, "127.0.0.1", 0))
            await trio.Path(args.port_file).write_text(str(port))

    trio.run(run)


def serve_app_asgi(args: argparse.Namespace) -> None:
    import trio

    from registry.http.disconnect import hold_disconnect
    from registry.http.server import serve_asgi
    from registry.serve.app import create_app
    from tests.fakes import MemoryContentStore, MemoryRouter

    async def run() -> None:
        app = hold_disconnect(create_app(MemoryContentStore(), MemoryRouter()))
        async with trio.open_nursery() as nursery:
            port = await nursery.start(functools.partial(serve_asgi, app, "127.0.0.1", 0))
            await trio.Path(args.port_file).write_text(str(port))

    trio.run(run)


def small_requests(port: int, pid: int, clients: int, seconds: float) -> dict[str, float]:
    """`clients` keep-alive connections asking GET /v2/ for `seconds`: requests/s, CPU."""
    import h11
    import trio

    request = h11.Request(method="GET", target="/v2/", headers=[("Host", "bench")])
    done = [0]

    async def client(deadline: float) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        conn = h11.Connection(h11.CLIENT)
        async with stream:
            while trio.current_time() < deadline:
                await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(1 << 16))
                    elif isinstance(event, h11.Response) and event.status_code != 200:
                        raise RuntimeError(f"GET /v2/ answered {event.status_code}")
                    elif isinstance(event, h11.EndOfMessage):
                        break
                conn.start_next_cycle()
                done[0] += 1

    async def load() -> None:
        deadline = trio.current_time() + seconds
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(client, deadline)

    before = cpu_seconds(pid)
    started = time.monotonic()
    trio.run(load)
    wall = time.monotonic() - started
    cpu = cpu_seconds(pid) - before
    return {
        "requests_per_s": round(done[0] / wall, 1),
        "cpu_ms_per_1000": round(cpu / max(done[0], 1) * 1e6, 1),
    }


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
        with open(path, "rb") as file:  # noqa: ASYNC230 - a local open, as the front door does
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
    port_file = work / f"{mode}.port"
    argv = [sys.executable, "-m", "bench.asgi_server", "--serve", mode, "--port-file"]
    argv += [str(port_file), "--blob-file", str(blob), "--digest", digest]
    argv += ["--slice-mib", str(slice_mib)]
    proc = subprocess.Popen(argv, cwd=ROOT)
    return proc, wait_port(port_file, proc)


def _median(samples: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(s[key] for s in samples), 3) for key in samples[0]}


def run(size_mib: int, rounds: int, slice_mib: int, clients: int, seconds: float) -> dict[str, Any]:
    size = size_mib << 20
    work = Path(tempfile.mkdtemp(prefix="spegla-bench-asgi-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        shaped = work / "content" / "blobs" / "sha256"
        shaped.mkdir(parents=True)
        blob = shaped / "blob"
        digest = make_blob(blob, size)
        blob = blob.rename(shaped / digest.removeprefix("sha256:"))
        front, front_port = _start("front-door", work, blob, digest, slice_mib)
        procs.append(front)
        zero, zero_port = _start("zerocopy", work, blob, digest, slice_mib)
        procs.append(zero)
        app_asgi, app_asgi_port = _start("app-asgi", work, blob, digest, slice_mib)
        procs.append(app_asgi)
        registry, registry_url = start_docker_registry(work, blob, digest)
        procs.append(registry)
        servers = {
            "front_door": (
                front.pid,
                f"http://127.0.0.1:{front_port}/v2/bench/blob/blobs/{digest}?ns=docker.io",
            ),
            "asgi_zerocopy": (zero.pid, f"http://127.0.0.1:{zero_port}/blob"),
            "docker_registry": (registry.pid, registry_url),
        }
        samples: dict[str, dict[str, list[dict[str, float]]]] = {
            name: {streams: [] for streams in STREAMS} for name in servers
        }
        for _, url in servers.values():
            download([url], size)  # warm-up: page cache, connections, lazy imports
        small = {"front_door": (front.pid, front_port), "serve_asgi": (app_asgi.pid, app_asgi_port)}
        small_samples: dict[str, list[dict[str, float]]] = {name: [] for name in small}
        for _ in range(rounds):  # alternate, so a noisy moment hits every server alike
            for name, (pid, url) in servers.items():
                samples[name]["1_stream"].append(measure(pid, url, size, 1))
                samples[name]["4_streams"].append(measure(pid, url, size, 4))
            for name, (pid, port) in small.items():
                small_samples[name].append(small_requests(port, pid, clients, seconds))
        results: dict[str, Any] = {"size_mib": size_mib, "rounds": rounds, "slice_mib": slice_mib}
        results["small_requests"] = {name: _median(small_samples[name]) for name in small}
        results["small_requests"]["clients"] = clients
        results["small_requests"]["ratios_serve_asgi_over_front_door"] = {
            key: round(
                results["small_requests"]["serve_asgi"][key]
                / max(results["small_requests"]["front_door"][key], 1e-9),
                3,
            )
            for key in ("requests_per_s", "cpu_ms_per_1000")
        }
        for name in servers:
            results[name] = {streams: _median(samples[name][streams]) for streams in STREAMS}

        def ratio(a: str, b: str, streams: str, key: str) -> float:
            return round(results[a][streams][key] / max(results[b][streams][key], 1e-9), 3)

        for a, b in (("asgi_zerocopy", "front_door"), ("asgi_zerocopy", "docker_registry")):
            results[f"ratios_{a}_over_{b}"] = {
                streams: {
                    "throughput": ratio(a, b, streams, "mb_s"),
                    "cpu_per_gib": ratio(a, b, streams, "cpu_s_per_gib"),
                }
                for streams in STREAMS
            }
        results["ratios_front_door_over_docker_registry"] = {
            streams: {
                "throughput": ratio("front_door", "docker_registry", streams, "mb_s"),
                "cpu_per_gib": ratio("front_door", "docker_registry", streams, "cpu_s_per_gib"),
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
    parser.add_argument("--clients", type=int, default=32, help="small requests: connections")
    parser.add_argument("--seconds", type=float, default=3.0, help="small requests: per run")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    parser.add_argument(
        "--serve", choices=["front-door", "zerocopy", "app-asgi"], help=argparse.SUPPRESS
    )
    parser.add_argument("--port-file", help=argparse.SUPPRESS)
    parser.add_argument("--blob-file", default="", help=argparse.SUPPRESS)
    parser.add_argument("--digest", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve == "front-door":
        serve_front_door(args)
        return
    if args.serve == "zerocopy":
        serve_zerocopy(args)
        return
    if args.serve == "app-asgi":
        serve_app_asgi(args)
        return
    if shutil.which("curl") is None or shutil.which("docker-registry") is None:
        raise SystemExit("bench.asgi_server needs curl and docker-registry (Debian packages)")
    if not (1 <= args.rounds <= 20 and 1 <= args.size_mib <= 8192 and 1 <= args.clients <= 500):
        raise SystemExit("--rounds 1..20, --size-mib 1..8192, --clients 1..500")
    if not 0.5 <= args.seconds <= 60:
        raise SystemExit("--seconds 0.5..60")
    result = run(args.size_mib, args.rounds, args.slice_mib, args.clients, args.seconds)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
