"""An isolated containerd 1.6 daemon for tests, optionally inside a network namespace.

Why: spegla serves content out of containerd, and containerd pulls through the node's mirror; both
must be the real thing.  Each instance has its own root/state/temp/opt paths and sockets, so several
run side by side (and beside any system containerd) without sharing anything.  CRI is on (pulls go
the kubelet way), ``discard_unpacked_layers = false`` (compressed layers stay for peers) and
``config_path`` points at the instance's own certs.d (CRI re-reads it on every pull).

For CRI pulls containerd itself does the HTTP fetches, so inside a namespace its ``127.0.0.1``
is the node's own loopback.  The unix sockets are filesystem paths, reachable from every namespace.

API
- ``Containerd(workdir, netns=None, name="containerd", registry_config_path=None,
  discard_unpacked_layers=False)``; ``.start()``, ``.stop()``, ``.restart()``, ``.kill()``; context
  manager. ``registry_config_path`` replaces the CRI ``config_path`` (``""``: the line is left out),
  and ``discard_unpacked_layers=True`` turns it on: the ways a node is misconfigured for spegla.
- ``.socket`` (grpc unix socket path), ``.content_path``
  (``<root>/io.containerd.content.v1.content``), ``.certs_d``, ``.log_path``,
  ``.log_text()``, ``.pid``.
- ``.write_hosts_toml(registry_host, server_url, mirrors, capabilities=("pull", "resolve"))``:
  ``certs.d/<registry_host>/hosts.toml`` in the format containerd 1.6 accepts.
- ``hosts_toml(server_url, mirrors, capabilities)`` -> str (pure).
"""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from .cri import CriClient, CriError
from .procs import Daemon

NAMESPACE = "k8s.io"


def hosts_toml(
    server_url: str, mirrors: Sequence[str], capabilities: Sequence[str] = ("pull", "resolve")
) -> str:
    """containerd 1.6 needs an explicit ``http://`` and at least one ``[host]`` table."""
    caps = ", ".join(f'"{c}"' for c in capabilities)
    lines = [f'server = "{server_url}"', ""]
    for m in mirrors:
        lines += [f'[host."{m}"]', f"  capabilities = [{caps}]", ""]
    return "\n".join(lines)


class Containerd:
    def __init__(
        self,
        workdir: Path,
        netns: str | None = None,
        name: str = "containerd",
        registry_config_path: str | None = None,
        discard_unpacked_layers: bool = False,
    ) -> None:
        self.workdir = workdir
        self.netns = netns
        self.name = name
        self.registry_config_path = registry_config_path
        self.discard_unpacked_layers = discard_unpacked_layers
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
    def log_path(self) -> Path:
        return self.workdir / "containerd.log"

    @property
    def content_path(self) -> Path:
        return self.root / "io.containerd.content.v1.content"

    @property
    def pid(self) -> int | None:
        return self.daemon.pid if self.daemon else None

    def _config(self) -> str:
        d = self.workdir
        config_path = (
            str(self.certs_d) if self.registry_config_path is None else self.registry_config_path
        )
        registry = (
            f'  [plugins."io.containerd.grpc.v1.cri".registry]\n    config_path = "{config_path}"\n'
            if config_path
            else ""
        )
        discard = "true" if self.discard_unpacked_layers else "false"
        return f"""version = 2
root = "{d / "root"}"
state = "{d / "state"}"
temp = "{d / "tmp"}"
disabled_plugins = ["io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{d / "containerd.sock.ttrpc"}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d / "opt"}"
[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  sandbox_image = "registry.invalid/pause:3.6"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    discard_unpacked_layers = {discard}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d / "opt" / "cni" / "bin"}"
    conf_dir = "{d / "cni" / "net.d"}"
{registry}"""

    def start(self, timeout: float = 15.0) -> Containerd:
        for sub in ("root", "state", "tmp", "opt", "certs.d", "cni/net.d"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "config.toml"
        cfg.write_text(self._config())
        self.socket.unlink(missing_ok=True)
        self.daemon = Daemon.start(
            self.name, ["containerd", "--config", str(cfg)], self.log_path, self.netns
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
