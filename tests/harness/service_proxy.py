"""A stand-in for a Kubernetes NodePort Service in front of the agents (kube-proxy's part).

Why: spegla's manifests give containerd a second mirror, `http://<node IP>:30021`, a NodePort
Service that kube-proxy forwards to a *ready* agent on any node.  Namespace clusters have no
kube-proxy, so this process plays it on one node: it listens on the Service port, probes every
endpoint's `/readyz` (as the endpoints controller follows readiness) and forwards each accepted
connection to the first ready endpoint in its list; with none ready it closes the connection at once
(kube-proxy rejects).  Each forwarded connection is logged as one JSON line.

Run: ``python -m tests.harness.service_proxy --listen 127.0.0.1:30021 --log FILE
--endpoint 10.213.1.1:5000 --endpoint 10.213.1.3:5000``.
API: ``read_log(path)`` -> list of endpoint strings, one per forwarded connection ("" = rejected).
"""

from __future__ import annotations

import argparse
import functools
import json
import socket
import struct
import time
from pathlib import Path

import trio

PROBE_PERIOD = 0.2


def read_log(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [str(json.loads(line)["endpoint"]) for line in lines if line.strip()]


def _split(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


async def _ready(endpoint: str) -> bool:
    host, port = _split(endpoint)
    with trio.move_on_after(0.5):
        try:
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(
                    b"GET /readyz HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n"
                )
                head = await stream.receive_some(64)
                return head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200"))
        except OSError:
            return False
    return False


class ServiceProxy:
    def __init__(self, endpoints: list[str], log: Path) -> None:
        self.endpoints = endpoints
        self.ready: dict[str, bool] = dict.fromkeys(endpoints, False)
        self.log = log

    async def probe_forever(self) -> None:
        while True:
            for endpoint in self.endpoints:
                self.ready[endpoint] = await _ready(endpoint)
            await trio.sleep(PROBE_PERIOD)

    def _record(self, endpoint: str) -> None:
        with open(self.log, "a") as fh:
            fh.write(json.dumps({"endpoint": endpoint, "time": time.time()}) + "\n")

    async def handle(self, client: trio.SocketStream) -> None:
        chosen = next((e for e in self.endpoints if self.ready[e]), "")
        self._record(chosen)
        async with client:
            if not chosen:
                # kube-proxy rejects a Service without ready endpoints: reset, not a clean close
                client.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                return
            try:
                upstream = await trio.open_tcp_stream(*_split(chosen))
            except OSError:
                return
            async with upstream, trio.open_nursery() as nursery:
                nursery.start_soon(_pump, client, upstream)
                nursery.start_soon(_pump, upstream, client)


async def _pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    try:
        while data := await source.receive_some(256 * 1024):
            await sink.send_all(data)
        await sink.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await trio.aclose_forcefully(sink)


async def main(listen: str, endpoints: list[str], log: Path) -> None:
    proxy = ServiceProxy(endpoints, log)
    host, port = _split(listen)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(proxy.probe_forever)
        await nursery.start(functools.partial(trio.serve_tcp, proxy.handle, port, host=host))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--endpoint", action="append", required=True)
    parser.add_argument("--log", required=True, type=Path)
    args = parser.parse_args()
    trio.run(main, args.listen, args.endpoint, args.log)
