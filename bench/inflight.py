"""In-flight downloads: how fast a new download is noticed, what watching costs, how fast a
growing file is served.

Why: issue 10 asks that a new ingest is noticed within ~100 ms without a busy loop, and that a layer
still arriving is streamed to peers as it lands.  This drives the agent's own pieces on real files
and sockets (no containerd needed): `agent.containerd.ingest.IngestWatcher` over a content directory
laid out as containerd 1.6 lays out its ingests (`ingest/<hash>/{ref,total,startedat,data}`), and
`registry.serve.inflight.send_growing` over a socket pair while a writer appends in 1 MiB steps (the
way containerd 1.6 writes a download).

  python -m bench.inflight --json [--downloads 40] [--size-mib 256]

Prints one JSON object on stdout:
- discovery_ms p50/p99/max: from the first bytes of a new ingest to the watcher's report;
- idle_cpu_percent: CPU of the watching process over 5 s with 3 downloads present;
- writer_mib_s / serve_mib_s: a file written as fast as it can be (1 MiB steps), and a reader
  following it through sendfile (the reader can only be as fast as the writer);
- tail_lag_ms: from the writer's last step to the reader's last byte.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from agent.containerd.ingest import IngestChange, IngestStarted, IngestWatcher
from registry.interfaces import IngestFile
from registry.serve.inflight import GrowingFile, InflightSettings, send_growing

MIB = 1024 * 1024


def progress(msg: str) -> None:
    print(f"[bench.inflight {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


WRITERS: list[Any] = []  # the downloads' data files, held open for writing as containerd does


def make_ingest(root: Path, n: int) -> str:
    """An ingest as containerd creates it, then its first bytes; returns the digest."""
    digest = "sha256:" + hashlib.sha256(f"layer-{n}".encode()).hexdigest()
    d = root / "ingest" / f"h{n:04d}"
    d.mkdir(parents=True)
    (d / "ref").write_text(f"k8s.io/1/layer-{digest}")
    (d / "total").write_text(str(64 * MIB))
    (d / "startedat").write_text(str(time.time()))
    writer = open(d / "data", "ab")  # stays open, as containerd's writer does
    writer.write(b"\0" * 4096)
    writer.flush()
    WRITERS.append(writer)
    return digest


async def discovery(root: Path, downloads: int) -> dict[str, Any]:
    seen: dict[str, float] = {}
    arrived = trio.Event()

    async def on_change(change: IngestChange, committed: bool) -> None:
        if isinstance(change, IngestStarted):
            seen[change.entry.digest] = time.monotonic()
            arrived.set()

    async def content_dir() -> str:
        return str(root)

    watcher = IngestWatcher(content_dir, "k8s.io", on_change)
    latencies = []
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        for n in range(downloads):
            await trio.sleep(0.013 * (n % 7))  # start at varying phases of the scan interval
            arrived = trio.Event()
            started = time.monotonic()
            digest = make_ingest(root, n)
            with trio.fail_after(5):
                while digest not in seen:
                    await arrived.wait()
                    arrived = trio.Event()
            latencies.append((seen[digest] - started) * 1000)
        # what watching costs while nothing changes (3 downloads present, as containerd runs)
        for writer in WRITERS[3:]:
            writer.close()
        for d in sorted((root / "ingest").iterdir())[3:]:
            for f in d.iterdir():
                f.unlink()
            d.rmdir()
        await trio.sleep(0.5)
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic()
        await trio.sleep(5.0)
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        wall = time.monotonic() - t0
        nursery.cancel_scope.cancel()
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "downloads": downloads,
        "scan_interval_ms": 50,
        "discovery_ms": {
            "p50": round(statistics.median(latencies), 1),
            "p99": round(q[98], 1),
            "max": round(max(latencies), 1),
        },
        "idle_cpu_percent": round(100 * cpu / wall, 2),
    }


async def serving(root: Path, size_mib: int) -> dict[str, Any]:
    data_path = root / "grow" / "data"
    data_path.parent.mkdir(parents=True)
    data_path.write_bytes(b"")
    chunk = os.urandom(MIB)
    size = size_mib * MIB
    ingest = IngestFile("sha256:" + "0" * 64, size, str(data_path), str(root / "blob"))
    a, b = trio.socket.socketpair()
    received = 0
    finished = {"writer": 0.0, "reader": 0.0, "started": 0.0}

    async def writer() -> None:
        with open(data_path, "ab") as f:  # noqa: ASYNC230 - the bench's own stand-in for containerd
            for _ in range(size_mib):
                f.write(chunk)
                f.flush()
                await trio.lowlevel.checkpoint()
        finished["writer"] = time.monotonic()

    async def reader() -> None:
        nonlocal received
        while received < size:
            data = await b.recv(4 * MIB)
            if not data:
                break
            received += len(data)
        finished["reader"] = time.monotonic()

    with a, b, GrowingFile(ingest, InflightSettings(poll_interval=0.005)) as growing:

        async def send_range(offset: int, count: int) -> None:
            done = 0
            while done < count:
                try:
                    done += os.sendfile(a.fileno(), growing.fd, offset + done, count - done)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(a)

        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(writer)
            await send_growing(growing, 0, size, send_range)
    elapsed = finished["reader"] - started
    return {
        "size_mib": size_mib,
        "writer_mib_s": round(size_mib / (finished["writer"] - started), 1),
        "serve_mib_s": round(size_mib / elapsed, 1),
        "tail_lag_ms": round((finished["reader"] - finished["writer"]) * 1000, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inflight", description=__doc__)
    parser.add_argument("--downloads", type=int, default=40)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--json", action="store_true", help="(the output is always JSON)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-inflight-") as tmp:
        root = Path(tmp)
        progress(f"discovery of {args.downloads} new downloads")
        out = trio.run(discovery, root / "content", args.downloads)
        progress(f"serving a {args.size_mib} MiB file while it is written")
        out.update(trio.run(serving, root, args.size_mib))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
