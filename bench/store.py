"""ContentStore read throughput: blobs read straight from containerd's content directory vs gRPC.

Why: the agent serves peers out of containerd's content store. Reading the blob file directly is
the fast path (and enables sendfile); `Content.Read` over gRPC is the fallback when the directory
is not readable. This measures both through `ContainerdContentStore` (Info check, open, read every
byte), on a private containerd with one imported image of `--size-mib` MiB (5 layers).

  python -m bench.store --json [--size-mib 128] [--repeat 3]

Prints one JSON object on stdout; progress on stderr. Needs root and Debian's containerd.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from agent.containerd.client import open_containerd
from agent.containerd.content_store import ContainerdContentStore
from tests.harness.containerd import Containerd
from tests.harness.fixtures import missing_requirements
from tests.harness.images import build_large

NAMESPACE = "k8s.io"


def progress(msg: str) -> None:
    print(f"[bench.store {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def read_all(store: ContainerdContentStore, digests: list[str]) -> int:
    total = 0
    for digest in digests:
        async with store.open(digest) as reader:
            async for chunk in reader.read(0, reader.size):
                total += len(chunk)
    return total


async def measure(socket: str, digests: list[str], repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with open_containerd(socket, NAMESPACE) as client:
        out["containerd"] = (await client.version()).version
        for mode, direct in (("file", True), ("grpc", False)):
            store = ContainerdContentStore(client, "", direct_reads=direct)
            await read_all(store, digests[:1])  # warm up (page cache, connection)
            runs = []
            for _ in range(repeat):
                start = time.perf_counter()
                n = await read_all(store, digests)
                runs.append(n / (time.perf_counter() - start) / 1e6)
            out[mode] = {
                "mb_s_best": round(max(runs), 1),
                "mb_s_median": round(statistics.median(runs), 1),
                "runs": [round(r, 1) for r in runs],
            }
            progress(f"{mode}: {out[mode]}")
    out["file_over_grpc"] = round(out["file"]["mb_s_median"] / out["grpc"]["mb_s_median"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the result as JSON (default)")
    args = parser.parse_args(argv)
    if args.size_mib < 5 or args.repeat < 1:
        parser.error("--size-mib must be >= 5 and --repeat >= 1")
    reason = missing_requirements()
    if reason:
        print(json.dumps({"skipped": reason}))
        return 0
    work = Path(tempfile.mkdtemp(prefix="spg-bstore-"))
    ctd = Containerd(work / "c", name="containerd-bench-store")
    try:
        progress(f"building a {args.size_mib} MiB image")
        image = build_large(work / "img", args.size_mib, name="bench")
        archive = work / "bench.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(image.path, arcname=".")
        ctd.start()
        subprocess.run(
            ["ctr", "-a", str(ctd.socket), "-n", NAMESPACE, "images", "import", "--no-unpack",
             "--index-name", "bench.test/store:v1", str(archive)],
            check=True, capture_output=True,
        )  # fmt: skip
        layers = [layer.digest for layer in image.manifests[0].layers]
        progress(f"reading {len(layers)} layers, {args.repeat} runs per mode")
        result = trio.run(measure, str(ctd.socket), layers, args.repeat)
        result.update(
            size_mib=args.size_mib,
            blobs=len(layers),
            bytes=sum(layer.size for layer in image.manifests[0].layers),
        )
        print(json.dumps(result, sort_keys=True))
        return 0
    finally:
        ctd.remove()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
