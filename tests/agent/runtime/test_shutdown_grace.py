"""Graceful shutdown (issue 12, item 8): on shutdown a running transfer finishes, however long it
takes, unless `--shutdown-grace` bounds it; new connections are refused at once.

Real agent wiring (run_agent with the real registry app and server) on loopback; the blob is a
file, so it goes out through the zero-copy path.  The client reads slowly with a small receive
buffer, so most of the blob is still to be sent when the shutdown starts.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from agent.config import RegistryConfig
from agent.runtime.run import AgentHandle, Hooks, run_agent
from agent.runtime.wiring import Backend
from registry.interfaces import Router
from tests.agent.runtime.test_run import config
from tests.fakes import MemoryContentStore

SIZE = 24 * 1024 * 1024


def file_backend(path: Path) -> Any:
    @asynccontextmanager
    async def factory(cfg: RegistryConfig, router: Router) -> AsyncIterator[Backend]:
        store = MemoryContentStore()
        store.add_file(path)

        async def run_tracker(
            *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        ) -> None:
            task_status.started()
            await trio.sleep_forever()

        yield Backend(store=store, run_tracker=run_tracker)

    return factory


async def slow_download(port: int, target: str, started: trio.Event) -> bytes:
    """GET `target` with a 64 KiB receive buffer, reading 64 KiB every 5 ms (~12 MiB/s)."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    request = f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    await stream.send_all(request.encode())
    data = bytearray()
    async with stream:
        while True:
            try:
                chunk = await stream.receive_some(64 * 1024)
            except trio.BrokenResourceError:
                break  # connection reset: the transfer was cut
            if not chunk:
                break
            data += chunk
            if len(data) > 1024 * 1024:
                started.set()
            await trio.sleep(0.005)
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:100]
    return body


async def shutdown_during_transfer(
    tmp_path: Path, grace: float | None
) -> tuple[bytes, bytes, float]:
    blob = os.urandom(SIZE)
    path = tmp_path / "blob"
    path.write_bytes(blob)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    cfg = config(str(tmp_path / "data"), standalone=True)
    cfg = RegistryConfig(**{**_fields(cfg), "shutdown_grace": grace})
    stop = trio.Event()
    started = trio.Event()
    result: list[bytes] = []
    async with trio.open_nursery() as nursery:
        handle: AgentHandle = await nursery.start(
            functools.partial(
                run_agent, cfg, stop, Hooks(backend=file_backend(path)), handle_signals=False
            )
        )
        target = f"/v2/app/blobs/{digest}?ns=example.com"

        async def download() -> None:
            result.append(await slow_download(handle.registry_port, target, started))

        nursery.start_soon(download)
        await started.wait()
        stop.set()
        stopped_at = trio.current_time()
        await trio.sleep(0.3)
        # the listener is closed: new connections are refused while the transfer drains
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", handle.registry_port)
    return blob, result[0], trio.current_time() - stopped_at


def _fields(cfg: RegistryConfig) -> dict[str, Any]:
    return {name: getattr(cfg, name) for name in RegistryConfig.__dataclass_fields__}


async def test_running_transfer_finishes_after_shutdown(tmp_path: Path) -> None:
    """The default (`none`): wait for the running transfer, even for seconds."""
    blob, body, drained = await shutdown_during_transfer(tmp_path, None)
    assert len(body) == len(blob) and body == blob
    assert drained > 1.0  # it really was still running when the shutdown started


async def test_grace_flag_bounds_the_wait(tmp_path: Path) -> None:
    blob, body, drained = await shutdown_during_transfer(tmp_path, 0.3)
    assert len(body) < len(blob)  # cut when the grace ran out
    assert body == blob[: len(body)]
    assert drained < 5.0
