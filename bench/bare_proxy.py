"""The floor of a verifying proxy on this machine: one blocking loop, no framework, no scheduler.

Why: bench.mirror compares the mirror path with single-core sha256, but a proxy also pays for two
loopback TCP copies per byte (and the TCP processing of both), and on a 2-core machine the peer and
the client take CPU from it.  This process does only what verification needs — read the peer's
body into one reused buffer, hash it, write it to the client, the last byte after the digest
matched — so bench.mirror can tell how much of the gap to sha256 is the agent and how much is the
machine.  Heads are read and written with h11; the body bypasses it, as in the agent.  One
connection at a time, one request per connection.

    python -m bench.bare_proxy --peer-port P --port-file F   (bench.mirror starts it)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
from pathlib import Path

import h11

from registry.mirror.job import MIRROR_DEFAULTS

READ_SIZE = MIRROR_DEFAULTS.stream_buffer_size  # the agent's reads of a streamed blob


def _read_head(sock: socket.socket, conn: h11.Connection) -> h11.Request | h11.Response:
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Request | h11.Response):
            return event
        if event is not h11.NEED_DATA:
            raise ConnectionError(f"unexpected {event!r}")
        conn.receive_data(sock.recv(65536))


def _proxy_one(client: socket.socket, peer_port: int) -> None:
    server = h11.Connection(h11.SERVER)
    request = _read_head(client, server)
    assert isinstance(request, h11.Request)
    target = bytes(request.target)
    digest = target.split(b"/blobs/", 1)[1].split(b"?", 1)[0].decode()
    with socket.create_connection(("127.0.0.1", peer_port)) as peer:
        peer_conn = h11.Connection(h11.CLIENT)
        head = h11.Request(
            method="GET",
            target=target,
            headers=[("Host", f"127.0.0.1:{peer_port}"), ("X-Spegel-Mirrored", "true")],
        )
        peer.sendall((peer_conn.send(head) or b"") + (peer_conn.send(h11.EndOfMessage()) or b""))
        response = _read_head(peer, peer_conn)
        assert isinstance(response, h11.Response)
        length = int(dict(response.headers)[b"content-length"])
        client.sendall(
            server.send(
                h11.Response(
                    status_code=response.status_code,
                    headers=[("Content-Length", str(length)), ("Connection", "close")],
                )
            )
            or b""
        )
        pending, _ = peer_conn.trailing_data
        hasher = hashlib.sha256()
        buffer = memoryview(bytearray(READ_SIZE))
        left = length
        fd = peer.fileno()
        while left:
            if pending:
                n = min(len(pending), left, READ_SIZE)
                buffer[:n] = pending[:n]
                pending = pending[n:]
            else:
                n = os.readv(fd, [buffer[: min(left, READ_SIZE)]])
                if n == 0:
                    raise ConnectionError("peer closed early")
            hasher.update(buffer[:n])
            left -= n
            client.sendall(buffer[: n - 1] if left == 0 else buffer[:n])  # hold the last byte
        if "sha256:" + hasher.hexdigest() == digest:
            client.sendall(buffer[n - 1 : n])


def serve(peer_port: int, port_file: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port_file.write_text(str(listener.getsockname()[1]))
        while True:
            client, _ = listener.accept()
            with client:
                try:
                    _proxy_one(client, peer_port)
                except (OSError, h11.ProtocolError, AssertionError, ValueError, IndexError):
                    pass  # a broken request: the client sees a short or empty answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--peer-port", type=int, required=True)
    parser.add_argument("--port-file", type=Path, required=True)
    args = parser.parse_args()
    serve(args.peer_port, args.port_file)


if __name__ == "__main__":
    main()
