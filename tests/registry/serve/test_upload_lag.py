"""A provider whose in-flight uploads fall behind its own download says busy to new peers."""

from __future__ import annotations

from pathlib import Path

from registry.burst.provider_choice import UploadSlots
from registry.interfaces import IngestFile
from registry.serve.inflight import GrowingFile, InflightUploads

D = "sha256:" + "ef" * 32
MIB = 1024 * 1024


def test_an_upload_behind_the_download_makes_the_node_lagging(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"x" * (6 * MIB))
    growing = GrowingFile(IngestFile(D, 10 * MIB, str(data), str(tmp_path / "blob")))
    growing.open()
    try:
        uploads = InflightUploads()
        upload = uploads.start(D, "10.0.0.2", 10 * MIB)  # a record kept here only
        upload.growing, upload.offset = growing, MIB
        assert upload.behind() == 5 * MIB and uploads.lagging(2 * MIB)
        upload.add(4 * MIB)  # caught up to 1 MiB behind what has arrived
        assert upload.behind() == MIB and not uploads.lagging(2 * MIB)
        slots = UploadSlots(8)
        assert slots.try_acquire(D, lagging=uploads.lagging(2 * MIB))
        assert slots.try_acquire(D, lagging=uploads.lagging(2 * MIB))
        upload.add(-4 * MIB)  # (as if it had not sent them) behind again
        assert not slots.try_acquire(D, lagging=uploads.lagging(2 * MIB))
        uploads.end(upload, ok=True)
        assert not uploads.lagging(0)
    finally:
        growing.close()
