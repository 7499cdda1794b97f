"""An isolated containerd daemon for tests (1.6 or 2.x), optionally inside a network namespace.

Why: spegla serves content out of containerd, and containerd pulls through the node's mirror; both
must be the real thing, on both containerd lines users run: 1.6 (Debian's ``containerd`` on PATH,
a version-2 config) and 2.x (the binaries in ``../shared/containerd/2.2.7/`` next to the checkout,
started from the version-3 config its own ``containerd config default`` writes).  Each instance has
its own root/state/temp/opt paths and sockets, so several run side by side (and beside any system
containerd) without sharing anything.  CRI is on (pulls go the kubelet way),
``discard_unpacked_layers = false`` (compressed layers stay for peers) and the registry
``config_path`` is the instance's own certs.d, ONE directory (2.x's transfer service, which does
its CRI pulls, takes the whole string as one directory).

For CRI pulls containerd itself does the HTTP fetches, so inside a namespace its ``127.0.0.1``
is the node's own loopback.  The unix sockets are filesystem paths, reachable from every namespace.

API
- ``Line`` (frozen): ``.id`` (``ctrd1.6`` / ``ctrd2.2``), ``.bin_dir`` (None: PATH),
  ``.missing()`` -> why it cannot run here, or None; ``.binary(name)``; ``.major``.
  ``LINE_1_6``, ``LINE_2_2``, ``LINES``, ``line_by_id(id)``.
- ``Containerd(workdir, netns=None, name="containerd", registry_config_path=None,
  discard_unpacked_layers=False, line=LINE_1_6, customize=None)``; ``.start()``, ``.stop()``,
  ``.restart()``, ``.kill()``; context manager. ``registry_config_path`` replaces the CRI
  ``config_path`` (``""``: the key is left out), ``discard_unpacked_layers=True`` turns it on: the
  ways a node is misconfigured for spegla.  ``customize(config_dict)`` edits the parsed config
  before it is written (``None`` and the dict untouched: spegla's settings as above).
- ``.socket`` (grpc unix socket path), ``.content_path``
  (``<root>/io.containerd.content.v1.content``), ``.certs_d``, ``.config_file``, ``.conf_d``
  (2.x: the directory the config's ``imports`` glob reads), ``.log_path``, ``.log_text()``,
  ``.pid``, ``.ctr(*args)`` -> argv of the line's own ``ctr`` on this instance's socket.
- ``.write_hosts_toml(registry_host, server_url, mirrors, capabilities=("pull", "resolve"))``:
  ``certs.d/<registry_host>/hosts.toml`` in the format both lines accept.
- ``hosts_toml(server_url, mirrors, capabilities)`` -> str (pure);
  ``config_v2(paths)`` / ``config_v3(default_config, paths)`` -> dict (pure).
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import tomli_w

from .cri import CriClient, CriError
from .procs import Daemon

NAMESPACE = "k8s.io"
REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_CONTAINERD = REPO_ROOT.parent / "shared" / "containerd"
BINARIES = ("containerd", "ctr", "containerd-shim-runc-v2")
SANDBOX_PLACEHOLDER = "registry.invalid/pause:3.6"


@dataclass(frozen=True, slots=True)
class Line:
    """One containerd release line the harness can run."""

    id: str
    major: int
    bin_dir: Path | None  # None: Debian's binaries on PATH

    def binary(self, name: str) -> str:
        return name if self.bin_dir is None else str(self.bin_dir / name)

    def missing(self) -> str | None:
        if self.bin_dir is None:
            return None if shutil.which("containerd") else "containerd is not on PATH"
        absent = [b for b in BINARIES if not os.access(self.bin_dir / b, os.X_OK)]
        if absent:
            return (
                f"containerd {self.id} binaries not found ({', '.join(absent)} missing in "
                f"../shared/containerd/{self.bin_dir.name}/ next to the checkout)"
            )
        return None


LINE_1_6 = Line("ctrd1.6", 1, None)
LINE_2_2 = Line("ctrd2.2", 2, SHARED_CONTAINERD / "2.2.7")
LINES = (LINE_1_6, LINE_2_2)


def line_by_id(line_id: str) -> Line:
    for line in LINES:
        if line.id == line_id:
            return line
    raise ValueError(f"unknown containerd line {line_id!r}")


def hosts_toml(
    server_url: str, mirrors: Sequence[str], capabilities: Sequence[str] = ("pull", "resolve")
) -> str:
    """containerd 1.6 needs an explicit ``http://`` and at least one ``[host]`` table."""
    doc: dict[str, Any] = {"server": server_url}
    if mirrors:
        doc["host"] = {m: {"capabilities": list(capabilities)} for m in mirrors}
    return tomli_w.dumps(doc)


@dataclass(frozen=True, slots=True)
class Paths:
    """The instance's own paths that go into its config."""

    workdir: Path
    socket: Path
    certs_d: Path

    def sub(self, name: str) -> str:
        return str(self.workdir / name)


def config_v2(p: Paths) -> dict[str, Any]:
    """The 1.6 config: version 2, only what differs from the built-in defaults."""
    return {
        "version": 2,
        "root": p.sub("root"),
        "state": p.sub("state"),
        "temp": p.sub("tmp"),
        "disabled_plugins": [
            "io.containerd.internal.v1.tracing",
            "io.containerd.tracing.processor.v1.otlp",
        ],
        "grpc": {"address": str(p.socket)},
        "ttrpc": {"address": p.sub("containerd.sock.ttrpc")},
        "plugins": {
            "io.containerd.internal.v1.opt": {"path": p.sub("opt")},
            "io.containerd.grpc.v1.cri": {
                "disable_tcp_service": True,
                "stream_server_address": "127.0.0.1",
                "stream_server_port": "0",
                "sandbox_image": SANDBOX_PLACEHOLDER,
                "containerd": {"snapshotter": "overlayfs", "discard_unpacked_layers": False},
                "cni": {"bin_dir": p.sub("opt/cni/bin"), "conf_dir": p.sub("cni/net.d")},
                "registry": {"config_path": str(p.certs_d)},
            },
        },
    }


def config_v3(default: dict[str, Any], p: Paths) -> dict[str, Any]:
    """The 2.x config: ``containerd config default`` output with the instance's paths and
    spegla's settings.  Everything else stays as the release ships it."""
    cfg = tomllib.loads(tomli_w.dumps(default))  # a deep copy
    cfg.update(root=p.sub("root"), state=p.sub("state"), temp=p.sub("tmp"))
    # the default imports /etc/containerd/conf.d/*.toml of the host: read the instance's own
    cfg["imports"] = [p.sub("conf.d/*.toml")]
    cfg["grpc"]["address"] = str(p.socket)
    cfg["ttrpc"]["address"] = p.sub("containerd.sock.ttrpc")
    plugins = cfg["plugins"]
    plugins["io.containerd.internal.v1.opt"]["path"] = p.sub("opt")
    images = plugins["io.containerd.cri.v1.images"]
    images["snapshotter"] = "overlayfs"
    images["discard_unpacked_layers"] = False
    images["pinned_images"]["sandbox"] = SANDBOX_PLACEHOLDER
    images["registry"]["config_path"] = str(p.certs_d)
    cri = plugins["io.containerd.grpc.v1.cri"]
    cri.update(disable_tcp_service=True, stream_server_address="127.0.0.1", stream_server_port="0")
    cni = plugins["io.containerd.cri.v1.runtime"]["cni"]
    cni.update(bin_dir="", bin_dirs=[p.sub("opt/cni/bin")], conf_dir=p.sub("cni/net.d"))
    # NRI listens on one host-wide socket path: instances side by side would fight over it
    plugins["io.containerd.nri.v1.nri"]["disable"] = True
    return cfg


@functools.cache
def default_config(line: Line) -> dict[str, Any]:
    """What the line's ``containerd config default`` writes (2.x only)."""
    out = subprocess.run(
        [line.binary("containerd"), "config", "default"],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    return tomllib.loads(out.stdout)


class Containerd:
    def __init__(
        self,
        workdir: Path,
        netns: str | None = None,
        name: str = "containerd",
        registry_config_path: str | None = None,
        discard_unpacked_layers: bool = False,
        line: Line = LINE_1_6,
        customize: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.workdir = workdir
        self.netns = netns
        self.name = name
        self.registry_config_path = registry_config_path
        self.discard_unpacked_layers = discard_unpacked_layers
        self.line = line
        self.customize = customize
        self.daemon: Daemon | None = None

    @property
    def root(self) -> Path:
        return self.workdir / "root"

    @property
    def socket(self) -> Path:
        return self.workdir / "containerd.sock"

    @property
    def certs_d(self) -> Path:
        return self.workdir / "certs.d"

    @property
    def conf_d(self) -> Path:
        return self.workdir / "conf.d"

    @property
    def config_file(self) -> Path:
        return self.workdir / "config.toml"

    @property
    def log_path(self) -> Path:
        return self.workdir / "containerd.log"

    @property
    def content_path(self) -> Path:
        return self.root / "io.containerd.content.v1.content"

    @property
    def pid(self) -> int | None:
        return self.daemon.pid if self.daemon else None

    def ctr(self, *args: str) -> list[str]:
        """argv of the line's own ``ctr`` talking to this instance."""
        return [self.line.binary("ctr"), "--address", str(self.socket), *args]

    def config(self) -> dict[str, Any]:
        paths = Paths(self.workdir, self.socket, self.certs_d)
        if self.line.major >= 2:
            cfg = config_v3(default_config(self.line), paths)
            cri_images = cfg["plugins"]["io.containerd.cri.v1.images"]
            registry = cri_images["registry"]
        else:
            cfg = config_v2(paths)
            cri_images = cfg["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
            registry = cfg["plugins"]["io.containerd.grpc.v1.cri"]["registry"]
        if self.registry_config_path == "":
            del registry["config_path"]
        elif self.registry_config_path is not None:
            registry["config_path"] = self.registry_config_path
        cri_images["discard_unpacked_layers"] = self.discard_unpacked_layers
        if self.customize is not None:
            self.customize(cfg)
        return cfg

    def start(self, timeout: float = 15.0) -> Containerd:
        reason = self.line.missing()
        if reason:
            raise RuntimeError(reason)
        for sub in ("root", "state", "tmp", "opt", "certs.d", "cni/net.d", "conf.d"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(tomli_w.dumps(self.config()))
        self.socket.unlink(missing_ok=True)
        env = None
        if self.line.bin_dir is not None:  # the shim is found on PATH: the line's own first
            env = {"PATH": f"{self.line.bin_dir}:{os.environ.get('PATH', '')}"}
        self.daemon = Daemon.start(
            self.name,
            [self.line.binary("containerd"), "--config", str(self.config_file)],
            self.log_path,
            self.netns,
            env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.daemon.alive():
                raise RuntimeError(f"containerd exited at start:\n{self.log_tail()}")
            if self.socket.exists():
                try:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(str(self.socket))
                    if "containerd successfully booted" in self.log_text() and self._cri_ready():
                        return self
                except OSError:
                    pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"containerd not ready after {timeout}s:\n{self.log_tail()}")

    def _cri_ready(self) -> bool:
        """CRI finishes initialising after containerd has booted; until then it answers
        "server is not initialized yet" to every call."""
        try:
            CriClient(self.socket).list()
        except (CriError, OSError):
            return False
        return True

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop(timeout=10)

    def kill(self) -> None:
        if self.daemon is not None:
            self.daemon.kill()

    def restart(self) -> Containerd:
        self.stop()
        return self.start()

    def remove(self) -> None:
        """Stop and delete the instance's directory (content, snapshots, sockets)."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def write_hosts_toml(
        self,
        registry_host: str,
        server_url: str,
        mirrors: Sequence[str],
        capabilities: Sequence[str] = ("pull", "resolve"),
    ) -> Path:
        d = self.certs_d / registry_host
        d.mkdir(parents=True, exist_ok=True)
        p = d / "hosts.toml"
        p.write_text(hosts_toml(server_url, mirrors, capabilities))
        return p

    def blob_path(self, digest: str) -> Path:
        algo, _, hexd = digest.partition(":")
        return self.content_path / "blobs" / algo / hexd

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).exists()
