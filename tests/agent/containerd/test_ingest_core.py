"""The ingest watcher's pure parts: refs to digests, the table of downloads, and how the
advertiser merges tracker keys, downloads and claims into one state per key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.advertising.advertiser import KeyStates
from agent.containerd.ingest import (
    IngestEntry,
    IngestRestarted,
    IngestStarted,
    IngestTable,
    IngestVanished,
    ScanCache,
    being_written,
    layer_digest,
    parse_total,
    scan_ingests,
)
from registry.interfaces import PeerState

D1 = "sha256:" + "a1" * 32
D2 = "sha256:" + "b2" * 32


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        (f"k8s.io/1/layer-{D1}", D1),
        (f"k8s.io/17/layer-{D1}\n", D1),
        (f"default/1/layer-{D1}", None),  # another namespace
        (f"k8s.io/1/config-{D1}", None),  # not a layer
        (f"k8s.io/1/manifest-{D1}", None),
        (f"k8s.io/1/layer-{D1[:-1]}", None),  # short digest
        (f"k8s.io/1/layer-{D1.upper()}", None),
        ("k8s.io/1/layer-md5:abc", None),
        ("", None),
        (f"layer-{D1}", None),
    ],
)
def test_layer_digest(ref: str, expected: str | None) -> None:
    assert layer_digest(ref, "k8s.io") == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1234", 1234),
        ("1234\n", 1234),
        ("0", None),
        ("-1", None),
        ("x", None),
        ("", None),
        ("9" * 30, None),
    ],
)
def test_parse_total(raw: str, expected: int | None) -> None:
    assert parse_total(raw) == expected


def entry(directory: str, digest: str, started: str = "t0", total: int = 100) -> IngestEntry:
    return IngestEntry(digest, f"k8s.io/1/layer-{digest}", directory, total, started)


def test_table_reports_start_restart_and_vanish() -> None:
    table = IngestTable()
    a, b = entry("/i/a", D1), entry("/i/b", D2)
    assert table.update([a]) == [IngestStarted(a)]
    assert table.update([a]) == []
    assert table.find(D1) == a and table.find(D2) is None
    a2 = entry("/i/a", D1, started="t1")
    assert table.update([a2, b]) == [IngestRestarted(a2), IngestStarted(b)]
    assert table.update([b]) == [IngestVanished(a2)]
    assert table.update([]) == [IngestVanished(b)]
    assert table.entries() == []


def test_scan_reads_a_real_ingest_directory_layout(tmp_path: Path) -> None:
    root = tmp_path / "content"
    good = root / "ingest" / "h1"
    good.mkdir(parents=True)
    (good / "ref").write_text(f"k8s.io/1/layer-{D1}")
    (good / "total").write_text("4096")
    (good / "startedat").write_text("2026-11-30T08:00:00Z")
    (good / "data").write_bytes(b"x" * 10)
    no_total = root / "ingest" / "h2"
    no_total.mkdir()
    (no_total / "ref").write_text(f"k8s.io/1/layer-{D2}")
    config = root / "ingest" / "h3"
    config.mkdir()
    (config / "ref").write_text(f"k8s.io/1/config-{D2}")
    (config / "total").write_text("10")
    (root / "ingest" / "stray-file").write_text("x")
    empty = root / "ingest" / "h4"  # opened by containerd, GET not answered yet: not a source
    empty.mkdir()
    (empty / "ref").write_text(f"k8s.io/1/layer-{D2}")
    (empty / "total").write_text("4096")
    (empty / "data").write_bytes(b"")
    with open(good / "data", "ab"), open(empty / "data", "ab") as writing:  # as containerd does
        found = scan_ingests(str(root), "k8s.io")
        assert found == [
            IngestEntry(D1, f"k8s.io/1/layer-{D1}", str(good), 4096, "2026-11-30T08:00:00Z")
        ]
        assert scan_ingests(str(tmp_path / "missing"), "k8s.io") == []
        writing.write(b"y")  # the first bytes landed: now it is advertised
        writing.flush()
        rescanned = sorted(e.directory for e in scan_ingests(str(root), "k8s.io"))
        assert rescanned == sorted([str(good), str(empty)])
    assert os.path.isdir(good)  # a scan only reads
    # nobody writes them any more (their containerd died): no longer in flight
    assert scan_ingests(str(root), "k8s.io") == []


def test_key_states_merge_sources_best_first() -> None:
    states = KeyStates(committed_grace=100.0)
    assert states.claim(D1) == [(D1, PeerState.CLAIM)]
    assert states.start(D1) == [(D1, PeerState.INFLIGHT)]  # the download began
    assert states.unclaim(D1) == []  # still in flight
    assert states.finish(D1, committed=True, now=0.0) == [(D1, PeerState.COMPLETE)]
    assert states.track([D1]) == []  # the tracker takes over: no change seen outside
    assert states.untrack([D1]) == [(D1, None)]  # image deleted: withdrawn at once (no grace)


def test_a_claim_ends_when_its_download_starts_or_the_digest_is_held() -> None:
    """A claim left in place would come back as the effective state once the image is deleted
    (or the download aborted): peers would then wait on a node that fetches nothing."""
    states = KeyStates()
    states.claim(D1)
    states.start(D1)
    states.finish(D1, committed=True, now=0.0)
    states.track([D1])
    assert states.untrack([D1]) == [(D1, None)]  # deleted: withdrawn, no CLAIM comes back
    states.claim(D2)
    states.start(D2)
    assert states.finish(D2, committed=False, now=0.0) == [(D2, None)]  # aborted: gone
    states.track([D1])
    assert states.claim(D1) == []  # held: a claim never hides it
    assert states.untrack([D1]) == [(D1, None)]


def test_an_aborted_download_is_withdrawn_but_tracked_keys_stay() -> None:
    states = KeyStates()
    assert states.start(D2) == [(D2, PeerState.INFLIGHT)]
    assert states.finish(D2, committed=False, now=0.0) == [(D2, None)]
    states.track([D1])
    assert states.start(D1) == []  # complete beats in flight (a re-pull of content we have)
    assert states.finish(D1, committed=False, now=0.0) == []


def test_committed_digests_the_tracker_never_takes_expire() -> None:
    states = KeyStates(committed_grace=100.0)
    states.start(D1)
    states.finish(D1, committed=True, now=10.0)
    assert states.expire(50.0) == []
    assert states.expire(110.0) == [(D1, None)]


def test_a_scan_cache_rereads_only_directories_that_changed(tmp_path: Path) -> None:
    root = tmp_path / "content"
    d = root / "ingest" / "h1"
    d.mkdir(parents=True)
    (d / "ref").write_text(f"k8s.io/1/layer-{D1}")
    (d / "total").write_text("4096")
    (d / "startedat").write_text("t0")
    (d / "data").write_bytes(b"")
    cache: ScanCache = {}
    writer = open(d / "data", "ab")
    assert scan_ingests(str(root), "k8s.io", cache) == []  # no bytes yet
    writer.write(b"x")
    writer.flush()
    assert [e.started for e in scan_ingests(str(root), "k8s.io", cache)] == ["t0"]
    (d / "ref").write_text("k8s.io/1/layer-sha256:" + "00" * 32)  # in place: not re-read
    assert [e.digest for e in scan_ingests(str(root), "k8s.io", cache)] == [D1]
    # containerd restarting the download writes its files anew (atomic renames): re-read
    (d / "startedat.tmp").write_text("t1")
    os.rename(d / "startedat.tmp", d / "startedat")
    (d / "ref").write_text(f"k8s.io/1/layer-{D1}")
    assert [e.started for e in scan_ingests(str(root), "k8s.io", cache)] == ["t1"]
    writer.close()
    for f in d.iterdir():
        f.unlink()
    d.rmdir()
    assert scan_ingests(str(root), "k8s.io", cache) == [] and cache == {}


def test_a_download_nobody_writes_is_not_in_flight(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"x" * 100)
    with open(data, "ab"):
        assert being_written(str(data))
    assert not being_written(str(data))  # left behind: its writer is gone
    assert not being_written(str(tmp_path / "missing"))


CHILD = """
import fcntl, sys
from agent.containerd import ingest

real = fcntl.fcntl

def pausing(fd, cmd, arg=0):
    out = real(fd, cmd, arg)
    if cmd == fcntl.F_SETLEASE and arg == fcntl.F_RDLCK:
        print("leased", flush=True)  # the probe's window is open: the parent opens for writing
        sys.stdin.readline()
    return out

ingest.fcntl.fcntl = pausing
print("written" if ingest.being_written(sys.argv[1]) else "idle", flush=True)
"""


def test_a_writer_opening_inside_the_lease_window_does_not_kill_the_prober(tmp_path: Path) -> None:
    """The lease probe's window held open on purpose: a writer's open breaks the lease, the kernel
    signals the holder (SIGIO, deadly by default), and the probing process lives on."""
    import subprocess
    import sys

    data = tmp_path / "data"
    data.write_bytes(b"x" * 100)
    repo = Path(__file__).resolve().parents[3]
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=repo,
    )  # fmt: skip
    assert child.stdout is not None and child.stdin is not None
    try:
        assert child.stdout.readline().strip() == "leased"
        with pytest.raises(BlockingIOError):  # the lease is held: the open breaks it, not waits
            os.open(data, os.O_WRONLY | os.O_NONBLOCK)
        child.stdin.write("go\n")
        child.stdin.flush()
        answer = child.stdout.readline().strip()
        assert child.wait(timeout=30) == 0, f"prober died: {child.returncode}"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert answer == "idle"  # nobody had it open for writing when the probe looked
