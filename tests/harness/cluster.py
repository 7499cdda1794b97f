"""A multi-node cluster on one machine: namespaces, an upstream registry, containerd per node.

Why: the e2e tests, ``hack/cluster``, ``make demo`` and the cluster bench all need the same thing —
N nodes with their own addresses, each with a real containerd whose CRI pulls go through that node's
own ``127.0.0.1`` mirror, and a real upstream registry whose access log tells which node fetched
what.  Everything it starts is recorded (by PID and start time) in ``<workdir>/state.json``, so
``down()`` stops exactly that, also from another process, and also after a crash
(``teardown_leftovers()``, used by ``hack/cluster down``).

API
- ``Cluster(workdir, nodes=3, rate_mbit=None, tag=None, persistent=False, line=LINE_1_6)``
  (``line``: the containerd release line every node runs, see ``containerd.Line``);
  ``.up(images=None, large_mib=4)`` (builds/pushes the test images), ``.down()`` (its files are
  deleted in a background thread); ``Cluster.load(workdir)`` re-attaches to a cluster started by
  another process.
- ``.nodes`` (list of ``Node``), ``.node(i)`` (1-based), ``.upstream`` (``Upstream``,
  reached at ``UPSTREAM_HOST``), ``.images`` (``TestImages``), ``.ref(name)`` ->
  ``10.213.0.2:5000/e2e/NAME:v1``.
- ``.configure_mirrors(port=5000, capabilities=...)``: hosts.toml on every node: upstream as
  ``server``, ``http://127.0.0.1:<port>`` as mirror.
- ``.start_standin_mirrors(port=5000)``: the 404 stand-in on every node; ``Node.mirror_log()``.
- ``.start_on_node(node, name, argv, env=None)`` -> ``Daemon`` inside the node's namespace;
  ``.stop_on_node(node, name)``.
- ``Node.pull(image, timeout)`` -> ``PullResult`` (seconds, image_id) via CRI;
  ``Node.remove(image)``; ``Node.http_get(url)`` (from inside the node namespace);
  ``Node.containerd``, ``Node.cri``.
- ``.limit_upstream(mbit)`` / ``.unlimit_upstream()``: tbf on the upstream's link;
  ``.limit_node(node, mbit | None)``: the same on a node's link.
- ``live_clusters()``, ``teardown_leftovers()``; ``ACTIVE`` (clusters up in this process);
  ``log_tails(cluster, lines)`` -> {title: text} for failure reports.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import netns, nsexec
from .containerd import LINE_1_6, Containerd, Line, line_by_id
from .cri import CriClient
from .images import TestImages, build_test_set
from .procs import Daemon, state_root, stop_leftover_daemons, stop_recorded
from .standin_mirror import MirrorRequest, read_log
from .upstream import Upstream

UPSTREAM_PORT = 5000
UPSTREAM_HOST = f"{netns.UPSTREAM_IP}:{UPSTREAM_PORT}"
REPO_ROOT = Path(__file__).resolve().parents[2]
ACTIVE: list[Cluster] = []  # clusters up in this process (failure reports show their logs)


def registry_dir() -> Path:
    """Pointers to every live cluster (any process), so leftovers can always be found."""
    return state_root()


def remove_in_background(path: Path) -> threading.Thread:
    """Delete `path` in a thread, once nothing of the cluster runs any more: a node's unpacked
    images take many seconds to delete and nothing waits for them.  The thread is not a daemon,
    so the interpreter finishes the deletion before it exits."""
    thread = threading.Thread(
        target=shutil.rmtree, args=(path,), kwargs={"ignore_errors": True}, name=f"rm {path}"
    )
    thread.start()
    return thread


@dataclass(frozen=True, slots=True)
class PullResult:
    image: str
    image_id: str
    seconds: float


class Node:
    def __init__(self, cluster: Cluster, index: int) -> None:
        self.cluster = cluster
        self.index = index
        self.name = f"n{index}"
        self.netns = cluster.topology.node(index)
        self.ip = netns.node_ip(index)
        self.workdir = cluster.workdir / self.name
        self.containerd = Containerd(
            self.workdir / "ctrd",
            netns=self.netns,
            name=f"containerd-{self.name}",
            line=cluster.line,
        )
        self.processes: dict[str, Daemon] = {}

    def __repr__(self) -> str:
        return f"Node({self.name}, {self.ip})"

    @property
    def cri(self) -> CriClient:
        return CriClient(self.containerd.socket)

    def pull(self, image: str, timeout: float = 300.0) -> PullResult:
        t0 = time.monotonic()
        image_id = self.cri.pull(image, timeout=timeout)
        return PullResult(image, image_id, time.monotonic() - t0)

    def remove(self, image: str) -> None:
        self.cri.remove(image)

    def http_get(
        self, url: str, headers: dict[str, str] | None = None, timeout: float = 5.0
    ) -> tuple[int, dict[str, str], bytes]:
        return nsexec.http_get(url, self.netns, timeout=timeout, headers=headers)

    @property
    def mirror_log_path(self) -> Path:
        return self.workdir / "mirror.jsonl"

    def mirror_log(self) -> list[MirrorRequest]:
        return read_log(self.mirror_log_path)


class Cluster:
    def __init__(
        self,
        workdir: Path,
        nodes: int = 3,
        rate_mbit: float | None = None,
        tag: str | None = None,
        persistent: bool = False,
        line: Line = LINE_1_6,
    ) -> None:
        if not 1 <= nodes <= 50:
            raise ValueError("nodes must be between 1 and 50")
        self.workdir = workdir
        self.tag = tag or secrets.token_hex(2)
        self.topology = netns.Topology(self.tag, nodes)
        self.rate_mbit = rate_mbit
        self.persistent = persistent
        self.line = line
        self.upstream = Upstream(
            workdir / "upstream", f"0.0.0.0:{UPSTREAM_PORT}", self.topology.upstream
        )
        self.upstream.host = UPSTREAM_HOST
        self.nodes = [Node(self, i) for i in range(1, nodes + 1)]
        self.images: TestImages | None = None
        self._down = False
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------------

    def node(self, i: int) -> Node:
        return self.nodes[i - 1]

    def ref(self, name: str) -> str:
        if self.images is not None:
            for img in self.images.all:
                if img.name == name:
                    return f"{UPSTREAM_HOST}/e2e/{name}:{img.tag}"
        return f"{UPSTREAM_HOST}/e2e/{name}:v1"

    def up(self, images: TestImages | None = None, large_mib: int = 4) -> Cluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        registry_dir().mkdir(parents=True, exist_ok=True)
        (registry_dir() / f"{self.tag}.json").write_text(json.dumps({"workdir": str(self.workdir)}))
        if not self.persistent:
            atexit.register(self.down)
            exit_on_sigterm()
        ACTIVE.append(self)
        try:
            self._save()
            netns.create(self.topology)
            self._save()
            if self.rate_mbit:
                self.limit_upstream(self.rate_mbit)
            self.upstream.start()
            self._save()
            for n in self.nodes:
                n.containerd.start()
                self._save()
            self.images = images or build_test_set(self.workdir / "images", large_mib=large_mib)
            for img in self.images.all:
                self.upstream.push(img)
            self.configure_mirrors()
        except BaseException:
            self.down()
            raise
        self._save()
        return self

    def down(self, remove_files: bool = True) -> list[str]:
        """Stop everything this cluster started (by PID) and delete its namespaces."""
        with self._lock:
            if self._down:
                return []
            self._down = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.down)
        with contextlib.suppress(ValueError):
            ACTIVE.remove(self)
        warnings: list[str] = []
        for n in self.nodes:
            for d in n.processes.values():
                d.stop()
        for n in self.nodes:
            n.containerd.stop()
        self.upstream.stop()
        warnings += netns.destroy(self.topology.all_namespaces)
        (registry_dir() / f"{self.tag}.json").unlink(missing_ok=True)
        if remove_files:
            remove_in_background(self.workdir)
        return warnings

    def __enter__(self) -> Cluster:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # -- node processes and config ---------------------------------------------------------------

    def configure_mirrors(
        self, port: int = 5000, capabilities: Sequence[str] = ("pull", "resolve")
    ) -> None:
        for n in self.nodes:
            n.containerd.write_hosts_toml(
                UPSTREAM_HOST, f"http://{UPSTREAM_HOST}", [f"http://127.0.0.1:{port}"], capabilities
            )

    def start_on_node(
        self,
        node: Node,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        ready_url: str | None = None,
        ready_timeout: float = 20.0,
    ) -> Daemon:
        """Start a process inside the node's namespace; optionally wait until ``ready_url``
        (fetched from inside the namespace) answers."""
        self.stop_on_node(node, name)
        d = Daemon.start(
            f"{name}-{node.name}", argv, node.workdir / f"{name}.log", node.netns, env, REPO_ROOT
        )
        node.processes[name] = d
        self._save()
        if ready_url:
            try:
                nsexec.wait_http(ready_url, node.netns, timeout=ready_timeout)
            except TimeoutError as e:
                tail = "\n".join(d.log_text().splitlines()[-20:])
                raise RuntimeError(f"{name} on {node.name} not ready: {e}\n{tail}") from e
        return d

    def stop_on_node(self, node: Node, name: str) -> None:
        d = node.processes.pop(name, None)
        if d is not None:
            d.stop()
            self._save()

    def start_standin_mirrors(self, port: int = 5000) -> None:
        for n in self.nodes:
            argv = [sys.executable, "-m", "tests.harness.standin_mirror",
                    "--listen", f"127.0.0.1:{port}", "--log", str(n.mirror_log_path)]  # fmt: skip
            self.start_on_node(n, "mirror", argv, ready_url=f"http://127.0.0.1:{port}/v2/")
        # the readiness probe itself is logged: start each test from a clean log
        for n in self.nodes:
            n.mirror_log_path.write_text("")

    def limit_upstream(self, mbit: float) -> None:
        netns.limit_rate(self.topology.upstream, mbit)
        self.rate_mbit = mbit

    def unlimit_upstream(self) -> None:
        netns.clear_rate(self.topology.upstream)
        self.rate_mbit = None

    def limit_node(self, node: Node, mbit: float | None) -> None:
        """tbf on a node's own link (what its agent serves to peers); ``None`` removes it."""
        if mbit:
            netns.limit_rate(node.netns, mbit)
        else:
            netns.clear_rate(node.netns)

    # -- state -----------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        daemons = []
        for n in self.nodes:
            daemons += [{"node": n.index, "role": k, **d.record()} for k, d in n.processes.items()]
            if n.containerd.daemon:
                daemons.append(
                    {"node": n.index, "role": "containerd", **n.containerd.daemon.record()}
                )
        if self.upstream.daemon:
            daemons.append({"node": 0, "role": "upstream", **self.upstream.daemon.record()})
        return {
            "tag": self.tag,
            "nodes": len(self.nodes),
            "rate_mbit": self.rate_mbit,
            "containerd_line": self.line.id,
            "namespaces": self.topology.all_namespaces,
            "daemons": daemons,
            "images": {i.name: self.ref(i.name) for i in self.images.all} if self.images else {},
        }

    def _save(self) -> None:
        tmp = self.workdir / "state.json.tmp"
        tmp.write_text(json.dumps(self._state(), indent=1))
        tmp.replace(self.workdir / "state.json")

    @classmethod
    def load(cls, workdir: Path) -> Cluster:
        st = json.loads((workdir / "state.json").read_text())
        line = line_by_id(st.get("containerd_line", LINE_1_6.id))
        c = cls(workdir, st["nodes"], st.get("rate_mbit"), st["tag"], persistent=True, line=line)
        for rec in st["daemons"]:
            d = Daemon.from_record(rec)
            if rec["role"] == "upstream":
                c.upstream.daemon = d
            elif rec["role"] == "containerd":
                c.node(rec["node"]).containerd.daemon = d
            else:
                c.node(rec["node"]).processes[rec["role"]] = d
        return c

    def save(self) -> None:
        self._save()


def log_tails(cluster: Cluster, lines: int = 25) -> dict[str, str]:
    """The last lines of every node process's log (agents, mirrors, containerd), noise dropped."""
    out = {}
    for n in cluster.nodes:
        logs = {name: d.log_path for name, d in n.processes.items()}
        logs["containerd"] = n.containerd.log_path
        for name, path in logs.items():
            try:
                text = path.read_text(errors="replace").splitlines()
            except FileNotFoundError:
                continue
            kept = [ln for ln in text if '"hpack' not in ln and "level=debug" not in ln]
            out[f"{n.name} {name} ({path})"] = "\n".join(kept[-lines:])
    return out


def live_clusters() -> list[Path]:
    out = []
    for p in sorted(registry_dir().glob("*.json")):
        with contextlib.suppress(ValueError, OSError, KeyError):
            out.append(Path(json.loads(p.read_text())["workdir"]))
    return out


def teardown_leftovers() -> list[str]:
    """Stop and remove every recorded cluster, then any other daemon the harness recorded, then
    any stray ``spg-`` namespace."""
    report: list[str] = []
    for p in sorted(registry_dir().glob("*.json")):
        try:
            workdir = Path(json.loads(p.read_text())["workdir"])
            st = json.loads((workdir / "state.json").read_text())
        except (ValueError, OSError, KeyError) as e:
            report.append(f"{p.name}: unreadable state ({e}); removing pointer")
            p.unlink(missing_ok=True)
            continue
        for rec in reversed(st.get("daemons", [])):
            stop_recorded(rec)
            report.append(f"stopped {rec['name']} (pid {rec['pid']})")
        report += netns.destroy(st.get("namespaces", []))
        report.append(f"removed cluster {st.get('tag')} ({workdir})")
        shutil.rmtree(workdir, ignore_errors=True)
        p.unlink(missing_ok=True)
    report += stop_leftover_daemons()
    stray = netns.existing_namespaces()
    if stray:
        report += netns.destroy(stray)
        report.append(f"removed stray namespaces: {' '.join(stray)}")
    netns.drop_safety_route_if_unused()
    return report


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so atexit/fixture teardown still runs."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:

        def handler(signum: int, frame: object) -> None:
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, handler)
