"""Serving a growing file (registry.serve.inflight) with real files and real sockets: bytes as they
land, the commit rename mid-stream, holes, truncation, a restarted download and a stall all
behave."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pytest
import trio
import trio.testing

from registry.events import MirrorEvents, TransferProgress
from registry.interfaces import IngestFile
from registry.mirror.transfer_report import TransferReport
from registry.serve.inflight import (
    GrowingFile,
    InflightSettings,
    InflightUploads,
    IngestBroken,
    SendRange,
    growing_chunks,
    send_growing,
    upload_growing,
)

CONTENT = os.urandom(3 * 1024 * 1024 + 123)
DIGEST = "sha256:" + hashlib.sha256(CONTENT).hexdigest()


def ingest_at(tmp: Path, size: int = len(CONTENT)) -> IngestFile:
    (tmp / "ingest" / "h").mkdir(parents=True, exist_ok=True)
    (tmp / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    return IngestFile(
        DIGEST, size, str(tmp / "ingest" / "h" / "data"), str(tmp / "blobs" / "sha256" / "x")
    )


def put(path: str, data: bytes) -> None:
    Path(path).write_bytes(data)


def append(path: str, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def put_at(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def sender(sock: trio.socket.SocketType, growing: GrowingFile) -> SendRange:
    """Send file ranges on `sock` by sendfile (what our ASGI server's zerocopysend does)."""

    async def send_range(offset: int, count: int) -> None:
        done = 0
        while done < count:
            try:
                done += os.sendfile(sock.fileno(), growing.fd, offset + done, count - done)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)

    return send_range


async def drain(sock: trio.socket.SocketType, into: bytearray) -> None:
    while True:
        data = await sock.recv(1 << 20)
        if not data:
            return
        into += data


async def test_bytes_go_out_as_they_land_and_the_commit_rename_is_followed(tmp_path: Path) -> None:
    ingest = ingest_at(tmp_path)
    data = Path(ingest.data_path)
    put(ingest.data_path, CONTENT[:1000])
    a, b = trio.socket.socketpair()
    received = bytearray()
    with a, b, GrowingFile(ingest, InflightSettings(poll_interval=0.005)) as growing:

        async def writer() -> None:
            for start in range(1000, len(CONTENT), 256 * 1024):
                await trio.sleep(0.01)
                append(ingest.data_path, CONTENT[start : start + 256 * 1024])
            os.rename(data, ingest.blob_path)  # containerd's commit
            os.rmdir(data.parent)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, b, received)
            nursery.start_soon(writer)
            sent = await send_growing(growing, 0, len(CONTENT), sender(a, growing))
            a.shutdown(socket.SHUT_WR)
    assert sent == len(CONTENT)
    assert bytes(received) == CONTENT


async def test_opening_after_the_commit_reads_the_blob_and_ranges_work(tmp_path: Path) -> None:
    ingest = ingest_at(tmp_path)
    put(ingest.blob_path, CONTENT)  # committed between lookup and open
    with GrowingFile(ingest) as growing:
        chunks = [c async for c in growing_chunks(growing, 100, 5000)]
    assert b"".join(chunks) == CONTENT[100:5100]


async def test_only_the_contiguous_prefix_is_read(tmp_path: Path) -> None:
    ingest = ingest_at(tmp_path)
    put(ingest.data_path, CONTENT[:65536])
    put_at(
        ingest.data_path, 1024 * 1024, CONTENT[1024 * 1024 : 1024 * 1024 + 65536]
    )  # landed first
    with GrowingFile(ingest) as growing:
        end = growing.contiguous_end(0)
        if end == 1024 * 1024 + 65536:
            pytest.skip("this filesystem reports no holes (SEEK_HOLE)")
        assert 65536 <= end < 1024 * 1024


async def expect_broken(growing: GrowingFile, start: int) -> str:
    with pytest.raises(IngestBroken) as caught:
        async for _ in growing_chunks(growing, start, len(CONTENT) - start):
            pass
    return str(caught.value)


async def test_a_truncated_download_cuts_the_stream(tmp_path: Path) -> None:
    ingest = ingest_at(tmp_path)
    put(ingest.data_path, CONTENT[:5000])
    with GrowingFile(ingest, InflightSettings(poll_interval=0.005)) as growing:
        os.truncate(ingest.data_path, 0)  # containerd's writer.Truncate(0) on a failed resume
        assert "shrank" in await expect_broken(growing, 4000)


async def test_a_restarted_download_cuts_the_stream(tmp_path: Path) -> None:
    ingest = ingest_at(tmp_path)
    put(ingest.data_path, CONTENT[:5000])
    with GrowingFile(ingest, InflightSettings(poll_interval=0.005)) as growing:
        os.unlink(ingest.data_path)  # aborted ...
        put(ingest.data_path, CONTENT[:6000])  # ... and begun again: a new file
        assert "aborted or restarted" in await expect_broken(growing, 5000)


async def test_an_aborted_download_cuts_the_stream(tmp_path: Path) -> None:
    ingest = ingest_at(tmp_path)
    put(ingest.data_path, CONTENT[:5000])
    with GrowingFile(ingest) as growing:
        os.unlink(ingest.data_path)
        assert "aborted" in await expect_broken(growing, 5000)


async def test_a_stalled_download_cuts_the_stream_after_the_stall_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    ingest = ingest_at(tmp_path)
    put(ingest.data_path, CONTENT[:5000])
    settings = InflightSettings(poll_interval=0.5, stall_timeout=10.0)
    with GrowingFile(ingest, settings) as growing:
        start = trio.current_time()
        assert "no new bytes" in await expect_broken(growing, 5000)
        assert 10.0 <= trio.current_time() - start <= 11.0


async def test_uploads_are_counted_and_a_cut_closes_the_connection(tmp_path: Path) -> None:
    ingest = ingest_at(tmp_path)
    put(ingest.data_path, CONTENT[:5000])
    a, b = trio.socket.socketpair()
    with a, b, GrowingFile(ingest, InflightSettings(poll_interval=0.005)) as growing:
        uploads = InflightUploads()
        os.unlink(ingest.data_path)
        with pytest.raises(IngestBroken):
            await upload_growing(growing, 0, len(CONTENT), "10.0.0.9", sender(a, growing), uploads)
        assert uploads.cut == 1 and not uploads.running
        [row] = uploads.snapshot()
        assert row["key"] == DIGEST and row["bytes"] == 5000 and row["state"] == "failed"


async def test_an_uploads_row_and_its_events_are_one_record(tmp_path: Path) -> None:
    """The debug page's row and the TransferProgress events of an in-flight upload come from
    the same transfer record: same id, same bytes, same end."""
    ingest = ingest_at(tmp_path)
    put(ingest.data_path, CONTENT)
    events = MirrorEvents()
    seen: list[TransferProgress] = []
    events.subscribe(lambda e: seen.append(e) if isinstance(e, TransferProgress) else None)
    report = TransferReport(
        events, key=DIGEST, peer="10.0.0.9", total=len(CONTENT), direction="out", source="inflight"
    )
    report.start()
    a, b = trio.socket.socketpair()
    uploads = InflightUploads()
    received = bytearray()
    with a, b, GrowingFile(ingest, InflightSettings(poll_interval=0.005)) as growing:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, b, received)
            sent = await upload_growing(
                growing, 0, len(CONTENT), "10.0.0.9", sender(a, growing), uploads, report
            )
            a.shutdown(socket.SHUT_WR)
    assert bytes(received) == CONTENT
    assert sent == len(CONTENT) and uploads.served == 1
    [row] = uploads.snapshot()
    assert (seen[0].state, seen[0].bytes) == ("running", 0)
    last = seen[-1]
    assert (last.state, last.bytes) == ("done", len(CONTENT)) == (row["state"], row["bytes"])
    assert {e.id for e in seen} == {row["id"]}
