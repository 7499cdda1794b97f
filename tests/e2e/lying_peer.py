"""A fake peer registry for the adversarial e2e suite: it answers every request with a malformed
head (a lie from a fixed rotation) and closes, printing one `LIE <n> <kind>` line per answer.

Why a process of its own: it sits where a peer's registry answers (a node's address and registry
port), started inside that node's namespace by the harness, so the agents under test reach it
over the namespace network exactly as they reach an honest peer.  Bounded: each request head is
read for at most 5 s and 64 KiB; it serves until stopped.

    python -m tests.e2e.lying_peer --listen 10.213.0.13:5000
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import socket
import socketserver
import sys
import threading

# (kind, head) pairs; header values are latin-1 bytes as a peer may send them (0xB2 is "²")
LIES: list[tuple[str, bytes]] = [
    ("busy-retry-after-superscript", b"HTTP/1.1 429 Too Many Requests\r\nretry-after: \xb2\r\n"),
    ("busy-retry-after-arabic", "HTTP/1.1 503 Unavailable\r\nretry-after: \u0661\r\n".encode()),
    ("content-length-huge", b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999999\r\n"),
    ("content-length-negative", b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n"),
    ("content-length-superscript", b"HTTP/1.1 200 OK\r\ncontent-length: \xb9\xb2\r\n"),
    (
        "content-range-superscript",
        b"HTTP/1.1 206 Partial\r\ncontent-range: bytes \xb9-\xb2/\xb3\r\n",
    ),
    ("status-999", b"HTTP/1.1 999 Whatever\r\ncontent-length: 0\r\n"),
    ("wrong-digest", b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n"),
]
_counter = itertools.count(1)
_lock = threading.Lock()


def _digest_header() -> bytes:
    wrong = hashlib.sha256(b"not what was asked for").hexdigest()
    return (
        f"docker-content-digest: sha256:{wrong}\r\ncontent-type: application/octet-stream\r\n"
    ).encode()


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(5.0)
        head = b""
        try:
            while b"\r\n\r\n" not in head and len(head) < 65536:
                data = sock.recv(65536)
                if not data:
                    return
                head += data
            with _lock:
                n = next(_counter)
            kind, lie = LIES[(n - 1) % len(LIES)]
            sock.sendall(lie + _digest_header() + b"connection: close\r\n\r\n" + b"lies")
            print(f"LIE {n} {kind}", flush=True)
        except OSError:
            return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    with _Server((host, int(port)), _Handler) as server:
        print(f"listening on {args.listen}", flush=True)
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
