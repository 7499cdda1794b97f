"""A real upstream registry (Debian's ``docker-registry``) with a parsed access log.

Why: the e2e tests must prove *where* every blob came from.  The registry's access log (combined
format on stderr) names the remote address of every request; inside the netns cluster that address
is the node that went upstream.

API
- ``Upstream(workdir, addr="127.0.0.1:0", netns=None)``; ``.start()``, ``.stop()``; context manager.
  ``addr="127.0.0.1:0"`` picks a free loopback port; in the cluster use ``"0.0.0.0:5000"`` + netns.
- ``.host`` ("127.0.0.1:PORT"; the cluster passes its own namespace address), ``.url``.
- ``.push(image, repo=None, tag=None)``: skopeo push of a ``BuiltImage`` to ``e2e/<name>:<tag>``
  (run inside the upstream's namespace when it has one, so the push is loopback there); returns
  the reference, also kept in ``.pushed[image.name]`` when pushed to that default repository (so
  a session-wide registry's names stay what every test expects).
- ``.access_log()`` -> list[``AccessRecord``] (remote_ip, method, path, status, bytes, ua);
  ``.blob_fetches(since=0)`` -> successful blob GETs; ``.blob_bytes(since=0)``;
  ``.mark()`` -> a position for ``since``.
- ``parse_access_line(line)`` -> ``AccessRecord | None`` (pure).
"""

from __future__ import annotations

import re
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from . import nsexec
from .images import BuiltImage
from .procs import Daemon

_ACCESS = re.compile(
    r'^(?P<ip>\S+) \S+ \S+ \[[^\]]*\] "(?P<method>[A-Z]+) (?P<path>\S+) [^"]*" '
    r'(?P<status>\d{3}) (?P<bytes>\d+|-) "[^"]*" "(?P<ua>[^"]*)"'
)
_BLOB = re.compile(r"^/v2/(?P<repo>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})")
_MANIFEST = re.compile(r"^/v2/(?P<repo>.+)/manifests/(?P<ref>[^?]+)")


@dataclass(frozen=True, slots=True)
class AccessRecord:
    remote_ip: str
    method: str
    path: str
    status: int
    bytes: int
    user_agent: str

    @property
    def blob_digest(self) -> str | None:
        m = _BLOB.match(self.path)
        return m.group("digest") if m else None

    @property
    def manifest_ref(self) -> str | None:
        m = _MANIFEST.match(self.path)
        return m.group("ref") if m else None


def parse_access_line(line: str) -> AccessRecord | None:
    m = _ACCESS.match(line.strip())
    if not m:
        return None
    ip = m.group("ip")
    if ip.count(":") == 1:  # "ip:port" in some versions
        ip = ip.split(":")[0]
    b = m.group("bytes")
    return AccessRecord(ip, m.group("method"), m.group("path"), int(m.group("status")),
                        0 if b == "-" else int(b), m.group("ua"))  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Upstream:
    def __init__(self, workdir: Path, addr: str = "127.0.0.1:0", netns: str | None = None) -> None:
        host, _, port = addr.rpartition(":")
        if port == "0":
            port = str(free_port())
        self.listen = f"{host}:{port}"
        self.port = int(port)
        self.netns = netns
        self.workdir = workdir
        self.host = f"127.0.0.1:{port}"  # how to reach it from where it runs; cluster overrides
        self.daemon: Daemon | None = None
        self.pushed: dict[str, str] = {}  # image name -> reference (HOST/e2e/NAME:TAG)

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "registry.log"

    def start(self) -> Upstream:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "config.yml"
        cfg.write_text(
            "version: 0.1\n"
            "log: {level: info, accesslog: {disabled: false}}\n"
            "storage:\n"
            f"  filesystem: {{rootdirectory: {self.workdir / 'storage'}}}\n"
            "  delete: {enabled: true}\n"
            "  cache: {blobdescriptor: inmemory}\n"
            "http:\n"
            f"  addr: {self.listen}\n"
            "  headers: {X-Content-Type-Options: [nosniff]}\n"
        )
        self.daemon = Daemon.start(
            "docker-registry", ["docker-registry", "serve", str(cfg)], self.log_path, self.netns
        )
        try:
            nsexec.wait_http(f"http://127.0.0.1:{self.port}/v2/", self.netns, timeout=15)
        except TimeoutError as e:
            self.stop()
            raise RuntimeError(f"docker-registry did not start: {self.log_tail()}") from e
        return self

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()

    def __enter__(self) -> Upstream:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def push(self, image: BuiltImage, repo: str | None = None, tag: str | None = None) -> str:
        """Push with skopeo; returns the reference ``HOST/e2e/NAME:TAG`` (with ``.host``)."""
        repo = repo or f"e2e/{image.name}"
        tag = tag or image.tag
        dest = f"docker://127.0.0.1:{self.port}/{repo}:{tag}"
        argv = ["skopeo", "--insecure-policy", "copy", "-q", "--all", "--dest-tls-verify=false",
                image.skopeo_source, dest]  # fmt: skip
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"skopeo push of {image.name} failed: {r.stderr.strip()}")
        ref = f"{self.host}/{repo}:{tag}"
        if repo == f"e2e/{image.name}":
            self.pushed[image.name] = ref
        return ref

    def mark(self) -> int:
        """A position in the access log; records after it are returned with ``since=``."""
        return len(self.access_log())

    def access_log(self, since: int = 0) -> list[AccessRecord]:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        recs = [r for r in map(parse_access_line, text.splitlines()) if r is not None]
        return recs[since:]

    def blob_fetches(self, since: int = 0) -> list[AccessRecord]:
        """Successful GETs of blobs (status 200/206), i.e. blob bytes served by upstream."""
        return [
            r
            for r in self.access_log(since)
            if r.method == "GET" and r.blob_digest and r.status in (200, 206)
        ]

    def blob_bytes(self, since: int = 0) -> int:
        return sum(r.bytes for r in self.blob_fetches(since))
