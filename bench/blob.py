"""Blob serving throughput: the agent's registry vs docker-registry, same blob, same machine.

Why: the agent must serve layers at least as fast, and as cheaply, as a plain Go registry. The
agent side is the real registry (the Quart-Trio app on our h11 server, blob bodies by its zero-copy
sends) in its own process, reading from a real containerd content store through
`agent.containerd.content_store.ContainerdContentStore`; the reference is Debian's docker-registry
serving the same bytes from its filesystem storage. Both listen on loopback; curl downloads (1
stream, then 4 in parallel) after one warm-up download. Server CPU is utime+stime of the server
process from /proc.

    python -m bench.blob --size-mib 1024 --json

Without root (no containerd) the agent serves the blob from a directory shaped like
containerd's content directory instead, and the JSON says so in `agent_store`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

GIB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def make_blob(path: Path, size: int) -> str:
    """Random bytes (not JSON, so a layer); returns the digest."""
    import hashlib

    hasher = hashlib.sha256()
    chunk = 8 << 20
    with open(path, "wb") as out:
        left = size
        while left:
            data = os.urandom(min(chunk, left))
            hasher.update(data)
            out.write(data)
            left -= len(data)
    return "sha256:" + hasher.hexdigest()


def download(urls: list[str], size: int) -> float:
    """Run one curl per URL at once; wall seconds. Raises unless every body had `size` bytes."""
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            ["curl", "-s", "-f", "-o", "/dev/null", "-w", "%{size_download}", url],
            stdout=subprocess.PIPE,
        )
        for url in urls
    ]
    outputs = [p.communicate()[0] for p in procs]
    wall = time.monotonic() - start
    for p, out in zip(procs, outputs, strict=True):
        if p.returncode != 0 or int(float(out or 0)) != size:
            raise RuntimeError(f"download failed: rc={p.returncode} got={out!r}")
    return wall


def measure(pid: int, url: str, size: int, streams: int) -> dict[str, float]:
    before = cpu_seconds(pid)
    wall = download([url] * streams, size)
    cpu = cpu_seconds(pid) - before
    total = size * streams
    return {
        "mb_s": round(total / wall / 1e6, 1),
        "cpu_s_per_gib": round(cpu / (total / GIB), 3),
        "wall_s": round(wall, 3),
    }


def wait_port(port_file: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            return int(port_file.read_text())
        if proc.poll() is not None:
            raise RuntimeError("server exited before listening")
        time.sleep(0.05)
    raise RuntimeError("server did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the agent side, run in its own process ------------------------------------------------------


def serve_agent(args: argparse.Namespace) -> None:
    import trio

    from registry.interfaces import ContentStore
    from registry.serve.app import Registry
    from registry.serve.server import run_registry
    from tests.fakes import MemoryContentStore, MemoryRouter

    async def run() -> None:
        async with AsyncExitStack() as stack:
            if args.containerd_sock:
                from agent.containerd.client import open_containerd
                from agent.containerd.content_store import ContainerdContentStore

                client = await stack.enter_async_context(
                    open_containerd(args.containerd_sock, "k8s.io")
                )
                store: ContentStore = ContainerdContentStore(client, args.content_path)
            else:
                memory = MemoryContentStore()
                memory.add_file(args.blob_file, digest=args.digest)
                store = memory
            registry = Registry(store, MemoryRouter())
            async with trio.open_nursery() as nursery:
                port = await nursery.start(
                    functools.partial(run_registry, registry, "127.0.0.1", 0)
                )
                await trio.Path(args.port_file).write_text(str(port))

    trio.run(run)


# --- orchestration -------------------------------------------------------------------------------


def start_containerd(work: Path, blob: Path, digest: str, size: int) -> tuple[Any, str, str]:
    """An isolated containerd holding the blob (gc root label). Returns (daemon, sock, content)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.harness.containerd import Containerd

    ctd = Containerd(work / "ctd").start()
    sock = str(ctd.socket)
    with open(blob, "rb") as data:
        subprocess.run(
            [
                "ctr",
                "--address",
                sock,
                "-n",
                "k8s.io",
                "content",
                "ingest",
                "--expected-digest",
                digest,
                "--expected-size",
                str(size),
                "bench-blob",
            ],
            stdin=data,
            check=True,
            capture_output=True,
        )
    subprocess.run(
        [
            "ctr",
            "--address",
            sock,
            "-n",
            "k8s.io",
            "content",
            "label",
            digest,
            "containerd.io/gc.root=bench",
        ],
        check=True,
        capture_output=True,
    )
    return ctd, sock, str(ctd.content_path)


def start_docker_registry(
    work: Path, blob: Path, digest: str
) -> tuple[subprocess.Popen[bytes], str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = work / "registry.yml"
    cfg.write_text(
        "version: 0.1\nlog:\n  level: error\n  accesslog: {disabled: true}\nstorage:\n"
        f"  filesystem: {{rootdirectory: {work / 'registry-storage'}}}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    proc = subprocess.Popen(
        ["docker-registry", "serve", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        if subprocess.run(["curl", "-s", "-f", "-o", "/dev/null", f"{base}/v2/"]).returncode == 0:
            break
        time.sleep(0.05)
    head = subprocess.run(
        [
            "curl",
            "-s",
            "-f",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-X",
            "POST",
            f"{base}/v2/bench/blob/blobs/uploads/",
        ],
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    location = next(
        line.split(":", 1)[1].strip()
        for line in head.splitlines()
        if line.lower().startswith("location:")
    )
    if location.startswith("/"):
        location = base + location
    sep = "&" if "?" in location else "?"
    subprocess.run(
        ["curl", "-s", "-f", "-o", "/dev/null", "-T", str(blob), f"{location}{sep}digest={digest}"],
        check=True,
    )
    return proc, f"{base}/v2/bench/blob/blobs/{digest}"


def run(size_mib: int) -> dict[str, Any]:
    size = size_mib << 20
    work = Path(tempfile.mkdtemp(prefix="spegla-bench-blob-"))
    procs: list[subprocess.Popen[bytes]] = []
    ctd = None
    try:
        blob = work / "blob"
        digest = make_blob(blob, size)
        use_containerd = os.geteuid() == 0 and shutil.which("containerd") is not None
        port_file = work / "agent.port"
        argv = [
            sys.executable,
            "-m",
            "bench.blob",
            "--serve-agent",
            "--port-file",
            str(port_file),
            "--digest",
            digest,
        ]
        if use_containerd:
            ctd, sock, content = start_containerd(work, blob, digest, size)
            argv += ["--containerd-sock", sock, "--content-path", content]
            agent_store = "containerd content store (ContainerdContentStore, direct reads)"
        else:
            shaped = work / "content" / "blobs" / "sha256"
            shaped.mkdir(parents=True)
            target = shaped / digest.removeprefix("sha256:")
            blob.rename(target)
            blob = target
            argv += ["--blob-file", str(blob)]
            agent_store = "directory shaped like containerd's content dir (no containerd: not root)"
        agent = subprocess.Popen(argv, cwd=Path(__file__).resolve().parent.parent)
        procs.append(agent)
        agent_port = wait_port(port_file, agent)
        agent_url = f"http://127.0.0.1:{agent_port}/v2/bench/blob/blobs/{digest}?ns=docker.io"
        registry, registry_url = start_docker_registry(work, blob, digest)
        procs.append(registry)
        results: dict[str, Any] = {"size_mib": size_mib, "agent_store": agent_store}
        for name, pid, url in (
            ("agent", agent.pid, agent_url),
            ("docker_registry", registry.pid, registry_url),
        ):
            download([url], size)  # warm-up: page cache, connections, lazy imports
            results[name] = {
                "1_stream": measure(pid, url, size, 1),
                "4_streams": measure(pid, url, size, 4),
            }
        results["ratios_agent_over_registry"] = {
            streams: {
                "throughput": round(
                    results["agent"][streams]["mb_s"] / results["docker_registry"][streams]["mb_s"],
                    3,
                ),
                "cpu_per_gib": round(
                    results["agent"][streams]["cpu_s_per_gib"]
                    / max(results["docker_registry"][streams]["cpu_s_per_gib"], 1e-9),
                    3,
                ),
            }
            for streams in ("1_stream", "4_streams")
        }
        return results
    finally:
        for proc in procs:
            stop(proc)
        if ctd is not None:
            ctd.remove()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    parser.add_argument("--serve-agent", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port-file", help=argparse.SUPPRESS)
    parser.add_argument("--containerd-sock", default="", help=argparse.SUPPRESS)
    parser.add_argument("--content-path", default="", help=argparse.SUPPRESS)
    parser.add_argument("--blob-file", default="", help=argparse.SUPPRESS)
    parser.add_argument("--digest", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_agent:
        serve_agent(args)
        return
    if shutil.which("curl") is None or shutil.which("docker-registry") is None:
        raise SystemExit("bench.blob needs curl and docker-registry (Debian packages)")
    result = run(args.size_mib)
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
