"""The send deadline (`ConnectionLimits.send_timeout`) bounds each wait for a client from both
sides: a client that stops reading holds its upload (the open blob file) until the deadline and
not past it.  Loopback sockets on virtual time, so the instants asserted are exact."""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path

import pytest
import trio
import trio.testing

from registry.http.server import ConnectionLimits
from registry.serve.app import Registry, RegistrySettings
from registry.serve.server import run_registry
from tests.clocks import loopback_clock
from tests.fakes import MemoryContentStore, MemoryNetwork, MemoryRouter
from tests.registry.conftest import LOOPBACK

SEND_TIMEOUT = 0.5
MARGIN = 0.01  # virtual seconds either side of the deadline


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return loopback_clock()


def open_descriptors_of(path: Path) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
        except OSError:
            pass
    return count


async def test_a_client_that_stops_reading_is_cut_at_the_send_deadline_not_after(
    clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    data = os.urandom(1 << 20) * 16  # 16 MiB: far more than the socket buffers hold
    path = tmp_path / "blob"
    path.write_bytes(data)
    store = MemoryContentStore()
    digest = store.add_file(path)
    registry = Registry(store, MemoryRouter(MemoryNetwork()), RegistrySettings())
    limits = ConnectionLimits(send_timeout=SEND_TIMEOUT)
    port = await nursery.start(
        functools.partial(run_registry, registry, LOOPBACK, 0, limits=limits)
    )
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((LOOPBACK, port))
    await sock.send(f"GET /v2/a/blobs/{digest}?ns=docker.io HTTP/1.1\r\nhost: x\r\n\r\n".encode())
    with trio.fail_after(5):  # the upload is under way: the buffers fill in no virtual time
        while open_descriptors_of(path) == 0:  # noqa: ASYNC110
            await trio.sleep(0.001)
    opened = trio.current_time()
    await trio.sleep_until(opened + SEND_TIMEOUT - MARGIN)
    assert open_descriptors_of(path) == 1  # still waiting for the client: not cut early
    await trio.sleep_until(opened + SEND_TIMEOUT + MARGIN)
    assert open_descriptors_of(path) == 0  # cut at the deadline, the file let go
    received = 0
    while chunk := await sock.recv(1 << 20):
        received += len(chunk)
    sock.close()
    assert 0 < received < len(data)  # the connection was cut, not finished
