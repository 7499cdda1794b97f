"""A stand-in for the node agent: a mirror that logs every request and answers 404.

Why: it tests the harness without the agent (containerd asks the mirror first, with
``?ns=``, then falls back to upstream), and it is the "agents answering 404" baseline of the bench.

Run: ``python -m tests.harness.standin_mirror --listen 127.0.0.1:5000 --log FILE``.
API: ``read_log(path)`` -> list[``MirrorRequest``] (method, path, ns, range).
"""

from __future__ import annotations

import argparse
import json
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO


@dataclass(frozen=True, slots=True)
class MirrorRequest:
    method: str
    path: str
    ns: str | None
    range: str | None


def read_log(path: Path) -> list[MirrorRequest]:
    out = []
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            d = json.loads(line)
        except ValueError:
            continue
        out.append(MirrorRequest(d["method"], d["path"], d.get("ns"), d.get("range")))
    return out


def _handler(log: IO[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            u = urllib.parse.urlsplit(self.path)
            ns = urllib.parse.parse_qs(u.query).get("ns", [None])[0]
            rec = {"method": self.command, "path": u.path, "ns": ns,
                   "range": self.headers.get("Range")}  # fmt: skip
            log.write(json.dumps(rec) + "\n")
            log.flush()
            body = b'{"errors":[{"code":"NOT_FOUND","message":"stand-in mirror"}]}'
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = _answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", default="127.0.0.1:5000")
    p.add_argument("--log", required=True, type=Path)
    a = p.parse_args()
    host, _, port = a.listen.rpartition(":")
    with open(a.log, "a") as log:
        server = ThreadingHTTPServer((host, int(port)), _handler(log))
        server.serve_forever()


if __name__ == "__main__":
    main()
