"""Cross-module hops of one blob GET in the registry before its first body byte.

Why: how many files a request passes through before its first byte is how much a reader must
follow to understand it; this counts a local and a mirrored GET alike on any layout of
`registry/` (it finds its entry points wherever they are defined).  The registry
runs as in production (its app on our h11 server, file bodies by zero-copy sends; on older
layouts `serve_registry` with the front door) on loopback over an in-memory
store; the peer holding the mirrored blobs is a subprocess (never traced).  A keep-alive h11
client GETs a warm-up blob of each kind, then `--runs` fresh ones under `sys.setprofile` (this
thread).  The window opens as the client sends (the server idles in its read) and closes at
the first hand-off of body bytes to the socket: `os.sendfile`/`os.write` called from registry
code, or a registry call of trio's `SocketStream.send_all` past the head's end.  Counted: calls
that start a frame (not a coroutine resuming) whose caller and callee are different files under
`registry/` (contextlib and functools frames looked through); a new trio task's calls count,
its spawning does not (trio's call).  `modules`: registry files entered.

    python -m bench.hops [--list]
"""

from __future__ import annotations

import argparse
import contextlib
import dis
import functools
import hashlib
import importlib
import json
import os
import pkgutil
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import h11
import trio

from bench.blob import wait_port

ROOT = Path(__file__).resolve().parent.parent
LOOK_THROUGH = {contextlib.__file__, functools.__file__}
SENDERS = (os.sendfile, os.write)
RESUME = dis.opmap["RESUME"]
COROUTINE_LIKE = 0x20 | 0x80 | 0x100 | 0x200  # generator, coroutine, iterable coro, async gen


def find(name: str, preferred: list[str], package: str = "registry") -> Any:
    """`name` from the first of `preferred` modules that has it, else from any module of
    `package` that defines it (the layout moves modules; the names stay)."""
    for module in preferred:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(root.__path__, package + "."):
        value = getattr(importlib.import_module(info.name), name, None)
        if value is not None and getattr(value, "__module__", None) == info.name:
            return value
    raise ImportError(f"no {name} under {package}")


def make_blob(directory: Path, seed: int, size: int) -> tuple[Path, str]:
    """A file of `size` bytes, the same for the same seed (stable digests across runs)."""
    data = random.Random(seed).randbytes(size)
    (path := directory / f"blob{seed}").write_bytes(data)
    return path, "sha256:" + hashlib.sha256(data).hexdigest()


def make_app(files: list[Path], peer: Any = None, digests: tuple[str, ...] = ()) -> Any:
    """The registry app over an in-memory store of `files`; `peer` provides `digests`."""
    create_app = find("create_app", ["registry.serve.app", "registry.app"])
    settings = find("RegistrySettings", ["registry.serve.app", "registry.app"])
    fake = functools.partial(find, preferred=["tests.fakes"], package="tests")
    store, network = fake("MemoryContentStore")(), fake("MemoryNetwork")()
    for path in files:
        store.add_file(path)
    for digest in digests:
        network.add(digest, peer)
    router = fake("MemoryRouter")(network)
    events = find("MirrorEvents", ["registry.mirror.events", "registry.events"])()
    peer_auth = find("PeerAuth", ["registry.mirror.peer_auth", "registry.peer_auth"])
    key = peer_auth(b"bench cluster key, 32 bytes long")  # as the default install: signed
    try:  # the app on a `Registry` (its task tree run beside the server), or the older layouts
        registry = find("Registry", ["registry.serve.app"])
    except ImportError:
        return create_app(store, router, settings(peer_auth=key), events=events)
    return registry(store, router, settings(peer_auth=key), events=events)


async def serve(app: Any, nursery: trio.Nursery) -> int:
    try:
        run_registry = find("run_registry", ["registry.serve.server"])
    except ImportError:
        run_registry = find("serve_registry", ["registry.serve.server", "registry.server"])
    return int(await nursery.start(functools.partial(run_registry, app, "127.0.0.1", 0)))


class Tracer:
    """The profile hook: cross-file registry calls until the first body byte goes out."""

    def __init__(self, root: Path = ROOT, tree: str = "registry") -> None:
        self.root, self.tree = root, root / tree
        self.files: dict[CodeType, str | None] = {}
        self.send_all = trio.SocketStream.send_all.__code__
        self.sent, self.calls, self.done = b"", 0, ""  # done: what closed the window
        self.edges: dict[tuple[str, str], int] = {}
        self.modules: dict[str, None] = {}  # first visit order

    def file(self, code: CodeType) -> str | None:
        if code not in self.files:
            path = Path(code.co_filename)
            inside = path.is_absolute() and path.is_relative_to(self.tree)
            self.files[code] = path.relative_to(self.root).as_posix() if inside else None
        return self.files[code]

    def hook(self, frame: FrameType, event: str, arg: Any) -> None:
        if self.done:
            return
        if event == "c_call":
            if any(arg is sender for sender in SENDERS) and self.file(frame.f_code):
                self.done = f"os.{arg.__name__}"
            return
        if event != "call" or not fresh(frame):
            return
        back = frame.f_back
        while back is not None and back.f_code.co_filename in LOOK_THROUGH:
            back = back.f_back
        caller = None if back is None else self.file(back.f_code)
        if frame.f_code is self.send_all and caller is not None:
            self.sent += bytes(frame.f_locals["data"])
            end = self.sent.find(b"\r\n\r\n")
            self.done = "SocketStream.send_all" if 0 <= end < len(self.sent) - 4 else ""
            return
        if (callee := self.file(frame.f_code)) is None:
            return
        if caller is not None and caller != callee:
            self.calls += 1
            self.edges[caller, callee] = self.edges.get((caller, callee), 0) + 1
            self.modules.setdefault(caller)
        self.modules.setdefault(callee)

    def result(self, listing: bool) -> dict[str, Any]:
        if not self.done:
            raise RuntimeError("the response's first body byte was never seen")
        out: dict[str, Any] = {"cross_file_calls": self.calls, "distinct_edges": len(self.edges)}
        out["modules"], out["boundary"] = len(self.modules), self.done
        if listing:
            out["module_list"] = list(self.modules)
            out["edges"] = {f"{a} -> {b}": n for (a, b), n in self.edges.items()}
        return out


def fresh(frame: FrameType) -> bool:
    """A call that starts the frame (not a coroutine or generator resuming at a yield/await)."""
    code = frame.f_code
    if not code.co_flags & COROUTINE_LIKE:
        return True
    i = frame.f_lasti
    return code.co_code[i] == RESUME and code.co_code[i + 1] & 3 == 0


async def get(stream: trio.SocketStream, conn: h11.Connection, digest: str, tracer: Any) -> None:
    """GET the blob on the keep-alive connection, its body read; traced from the send on."""
    target = f"/v2/library/hops/blobs/{digest}?ns=docker.io"  # as containerd asks a mirror
    data = conn.send(h11.Request(method="GET", target=target, headers=[("host", "x")]))
    status, event = 0, None
    sys.setprofile(tracer.hook if tracer else None)
    try:
        await stream.send_all(data + (conn.send(h11.EndOfMessage()) or b""))
        while not isinstance(event, h11.EndOfMessage):
            if (event := conn.next_event()) is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(1 << 20))
            elif isinstance(event, h11.Response):
                status = event.status_code
    finally:
        sys.setprofile(None)
    conn.start_next_cycle()
    await trio.sleep(0.3)  # the server's after-response work ends before the next request
    if status != 200:
        raise RuntimeError(f"GET {digest}: status {status}")


async def measure(peer_port: int, work: Path, remote: dict[str, list[str]], args: Any) -> Any:
    """Each kind: a warm-up GET, then one traced GET per run, each of a blob not asked before;
    the figures of the run with the median call count."""
    peer = find("Peer", ["registry.oci.interfaces", "registry.interfaces"])(
        node_id=b"\x01" * 32, host="127.0.0.1", port=peer_port
    )
    local = [make_blob(work, seed, args.mirror_size) for seed in range(1, args.runs + 2)]
    digests = tuple(digest for digests in remote.values() for digest in digests)
    app = make_app([path for path, _ in local], peer, digests)
    kinds = {"local_get": [digest for _, digest in local], **remote}
    results: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        port = await serve(app, nursery)
        stream, conn = await trio.open_tcp_stream("127.0.0.1", port), h11.Connection(h11.CLIENT)
        for name, (warm, *measured) in kinds.items():
            await get(stream, conn, warm, None)  # like containerd's keep-alive to its mirror
            runs = []
            for digest in measured:
                runs.append(Tracer())
                await get(stream, conn, digest, runs[-1])
            runs.sort(key=lambda tracer: tracer.calls)
            results[name] = runs[len(runs) // 2].result(args.list)
            results[name]["runs_calls"] = [tracer.calls for tracer in runs]
        await stream.aclose()
        nursery.cancel_scope.cancel()
    return results


async def serve_peer(port_file: str, files: list[str]) -> None:
    async with trio.open_nursery() as nursery:
        port = await serve(make_app([Path(f) for f in files]), nursery)
        await trio.Path(port_file).write_text(str(port))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list modules (visit order), edges")
    parser.add_argument("--mirror-size", type=int, default=256 << 10, help="verified first")
    parser.add_argument("--streamed-size", type=int, default=80 << 20, help="0: skip")
    parser.add_argument("--runs", type=int, default=3, help="traced GETs per kind (median)")
    parser.add_argument("--serve-peer", metavar="PORT_FILE", help=argparse.SUPPRESS)
    parser.add_argument("files", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_peer:
        trio.run(serve_peer, args.serve_peer, args.files)
        return
    sizes = {"mirror_get": args.mirror_size, "mirror_get_streamed": args.streamed_size}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        blobs = {  # per kind: the warm-up blob, then one per run
            name: [make_blob(work, 100 * (i + 1) + run, size) for run in range(args.runs + 1)]
            for i, (name, size) in enumerate(sizes.items())
            if size
        }
        port_file = work / "peer-port"
        files = [str(path) for pairs in blobs.values() for path, _ in pairs]
        cmd = [sys.executable, "-m", "bench.hops", "--serve-peer", str(port_file)]
        peer = subprocess.Popen([*cmd, *files], cwd=ROOT)
        try:
            remote = {name: [digest for _, digest in pairs] for name, pairs in blobs.items()}
            peer_port = wait_port(port_file, peer)
            results = trio.run(measure, peer_port, work, remote, args)
        finally:
            peer.terminate()
            peer.wait(10)
    git = ["git", "describe", "--always", "--dirty", "--tags"]
    tree = subprocess.run(git, cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(json.dumps({"tree": tree, **results}, indent=1))


if __name__ == "__main__":
    main()
