"""The load generator of `bench.load`: many keep-alive HTTP clients against one registry.

Why its own module (and process): `bench.load` runs it inside a node's network namespace with
`ip netns exec`, once against the agent and once against docker-registry, with the same plan, so
both servers see the same mix from the same client code.  Each client task keeps one connection
(h11 as the client), picks a request kind by weight, checks the answer and records its latency;
malformed requests go out on a connection of their own and must get a 400 and a close.

    python -m bench.load_client PLAN.json   (prints one JSON object)
"""

from __future__ import annotations

import json
import math
import random
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import trio

MALFORMED = (
    b"GARBAGE\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\n\r\n",  # no Host
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n",
    b"GET /v2/\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nno colon\r\n\r\n",
)
# as containerd asks (docker-registry answers an OCI manifest only to a client that accepts it)
HEADERS = [
    ("Host", "load"),
    (
        "Accept",
        "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, "
        "application/vnd.docker.distribution.manifest.v2+json, */*",
    ),
]
# a blob GET as containerd asks for a layer (the descriptor's media type first): the agent treats
# it as a layer, so claims and their waits take part as they do for users
BLOB_HEADERS = [("Host", "load"), ("Accept", "application/vnd.oci.image.layer.v1.tar+gzip, */*")]
FAILURES = (trio.TooSlowError, trio.BrokenResourceError, OSError, h11.ProtocolError)
KINDS = ("local_get", "mirror_get", "head", "miss", "malformed")


@dataclass(frozen=True, slots=True)
class Blob:
    path: str  # request target without the query
    digest: str
    size: int
    data: bytes = b""


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    wrong: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    server_errors: int = 0
    false_misses: int = 0
    samples: list[str] = field(default_factory=list)  # a few wrong answers, for the report

    def bad(self, kind: str, what: str) -> None:
        self.wrong[kind] += 1
        if len(self.samples) < 10:
            self.samples.append(f"{kind}: {what}")


class Closed(Exception):
    """The server closed the connection before answering (a stale keep-alive)."""


class Client:
    """One keep-alive connection."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def exchange(
        self, method: str, target: str, blob_get: bool = False
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        headers = BLOB_HEADERS if blob_get else HEADERS
        request = h11.Request(method=method, target=target, headers=headers)
        await self.stream.send_all(self.conn.send(request) + self.conn.send(h11.EndOfMessage()))
        status, headers, body = 0, {}, bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.receive_some(1 << 20)
                if not data and status == 0:
                    raise Closed()
                self.conn.receive_data(data)
            elif isinstance(event, h11.Response):
                status, headers = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, headers, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                raise Closed()

    @property
    def reusable(self) -> bool:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
            return True
        return False


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def rank(p: float) -> float:
        return round(ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1] * 1000, 2)

    return {"count": len(ordered), "p50_ms": rank(50), "p99_ms": rank(99), "max_ms": rank(100)}


class Load:
    def __init__(self, plan: dict[str, Any]) -> None:
        self.host: str = plan["host"]
        self.port: int = plan["port"]
        self.query = f"?ns={plan['ns']}" if plan.get("ns") else ""
        self.local = [self._blob(b) for b in plan["local_blobs"]]
        self.peer = [self._blob(b) for b in plan["peer_blobs"]]
        self.heads = [Blob(b["path"], b["digest"], b["size"]) for b in plan["head_targets"]]
        self.repo_prefix: str = plan["miss_prefix"]
        self.weights = [float(plan["weights"][k]) for k in KINDS]
        self.timeout = float(plan.get("timeout", 30.0))
        self.tally = Tally()

    @staticmethod
    def _blob(spec: dict[str, Any]) -> Blob:
        return Blob(spec["path"], spec["digest"], spec["size"], Path(spec["file"]).read_bytes())

    async def connect(self) -> Client:
        return Client(await trio.open_tcp_stream(self.host, self.port))

    async def run_client(self, seed: int, deadline: float) -> None:
        rng = random.Random(seed)
        client: Client | None = None
        while trio.current_time() < deadline:
            kind = rng.choices(KINDS, self.weights)[0]
            started = trio.current_time()
            if kind == "malformed":
                await self.malformed(rng.choice(MALFORMED), started)
                continue
            method, blob, target = self.request(kind, rng)
            answer = None
            for attempt in range(2):  # a stale keep-alive connection is retried once
                try:
                    if client is None:
                        client = await self.connect()
                    with trio.fail_after(self.timeout):
                        answer = await client.exchange(method, target, "/blobs/" in target)
                    break
                except Closed:
                    client = None
                    if attempt:
                        self.tally.bad(kind, "connection closed without an answer")
                except FAILURES as e:
                    client = None
                    self.tally.bad(kind, f"{type(e).__name__}: {e}")
                    break
            if answer is None:
                continue
            self.tally.latencies[kind].append(trio.current_time() - started)
            self.check(kind, method, blob, answer)
            if client is not None and not client.reusable:
                await client.stream.aclose()
                client = None
        if client is not None:
            await client.stream.aclose()

    def request(self, kind: str, rng: random.Random) -> tuple[str, Blob | None, str]:
        if kind == "local_get":
            blob = rng.choice(self.local)
            return "GET", blob, blob.path + self.query
        if kind == "mirror_get":
            blob = rng.choice(self.peer)
            return "GET", blob, blob.path + self.query
        if kind == "head":
            blob = rng.choice(self.heads)
            return "HEAD", blob, blob.path + self.query
        digest = "sha256:" + rng.randbytes(32).hex()
        return "GET", None, f"{self.repo_prefix}/blobs/{digest}{self.query}"

    def check(
        self,
        kind: str,
        method: str,
        blob: Blob | None,
        answer: tuple[int, dict[bytes, bytes], bytes],
    ) -> None:
        status, headers, body = answer
        if status >= 500:
            self.tally.server_errors += 1
        if kind == "miss":
            if status != 404:
                self.tally.bad(kind, f"status {status}")
            return
        assert blob is not None
        if kind == "mirror_get" and status == 404:
            self.tally.false_misses += 1
            return
        if status != 200:
            self.tally.bad(kind, f"status {status} for {blob.digest}")
        elif headers.get(b"content-length") != str(blob.size).encode():
            self.tally.bad(kind, f"content-length {headers.get(b'content-length')!r}")
        elif method == "GET" and body != blob.data:
            self.tally.bad(kind, f"body of {len(body)} bytes differs for {blob.digest}")

    async def malformed(self, raw: bytes, started: float) -> None:
        try:
            with trio.fail_after(self.timeout):
                stream = await trio.open_tcp_stream(self.host, self.port)
                try:
                    await stream.send_all(raw)
                    answer = bytearray()
                    while data := await stream.receive_some(1 << 16):
                        answer += data
                finally:
                    await stream.aclose()
        except (trio.TooSlowError, OSError, trio.BrokenResourceError) as e:
            self.tally.bad("malformed", f"{type(e).__name__}: {e}")
            return
        self.tally.latencies["malformed"].append(trio.current_time() - started)
        status_line = bytes(answer).split(b"\r\n", 1)[0]
        if not status_line.startswith(b"HTTP/1.1 400"):
            self.tally.bad("malformed", f"answer {status_line[:40]!r} to {raw[:30]!r}")
            if status_line[9:10] == b"5":
                self.tally.server_errors += 1


async def run(plan: dict[str, Any]) -> dict[str, Any]:
    load = Load(plan)
    duration = float(plan["duration"])
    started = trio.current_time()
    deadline = started + duration
    async with trio.open_nursery() as nursery:
        for i in range(int(plan["clients"])):
            nursery.start_soon(load.run_client, i, deadline)
    elapsed = trio.current_time() - started
    tally = load.tally
    total = sum(len(v) for v in tally.latencies.values())
    return {
        "requests": total,
        "elapsed_s": round(elapsed, 2),
        "requests_per_s": round(total / duration, 1),
        "wrong_answers": sum(tally.wrong.values()),
        "wrong_by_kind": tally.wrong,
        "server_errors_5xx": tally.server_errors,
        "false_misses": tally.false_misses,
        "false_miss_ratio": round(
            tally.false_misses / max(1, len(tally.latencies["mirror_get"]) + 0), 5
        ),
        "latency": {kind: percentiles(values) for kind, values in tally.latencies.items()},
        "wrong_samples": tally.samples,
    }


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(json.dumps(trio.run(run, plan)))


if __name__ == "__main__":
    main()
