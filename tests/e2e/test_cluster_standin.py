"""The first end-to-end proof of the harness (issue 2, item 5): three node namespaces pull through
containerd's CRI path; each node's hosts.toml points at a 404 stand-in mirror on that node's own
127.0.0.1.  Every node must ask its mirror first (with ``?ns=``) and then fetch every blob from the
upstream registry, which is addressed by its namespace address (loopback would hide scheme
mistakes in hosts.toml)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import netns
from tests.harness.cluster import UPSTREAM_HOST, Cluster
from tests.harness.procs import is_alive

pytestmark = pytest.mark.root
REPO = Path(__file__).resolve().parents[2]


def test_every_node_asks_its_mirror_then_fetches_every_blob_upstream(
    cluster: Callable[..., Cluster],
) -> None:
    c = cluster(nodes=3)
    c.start_standin_mirrors()
    assert c.images is not None
    small = c.images.small
    ref = c.ref("small")
    assert ref.startswith(f"{netns.UPSTREAM_IP}:")
    mark = c.upstream.mark()
    for node in c.nodes:
        assert node.pull(ref).image_id == small.for_platform().config.digest

    for node in c.nodes:
        asked = node.mirror_log()
        assert asked, f"{node.name}: its mirror was never asked (hosts.toml ignored?)"
        assert all(r.ns == UPSTREAM_HOST for r in asked), asked
        assert ("HEAD", "/v2/e2e/small/manifests/v1") in {(r.method, r.path) for r in asked}
        mirror_blobs = {r.path.rsplit("/", 1)[1] for r in asked if "/blobs/" in r.path}
        assert mirror_blobs == set(small.blob_digests())

    fetches = c.upstream.blob_fetches(mark)
    for node in c.nodes:
        from_upstream = {r.blob_digest for r in fetches if r.remote_ip == node.ip}
        assert from_upstream == set(small.blob_digests()), node
        for digest in small.blob_digests():
            assert node.containerd.has_blob(digest)


def test_root_namespace_cannot_reach_node_addresses(cluster: Callable[..., Cluster]) -> None:
    cluster(nodes=1)
    r = subprocess.run(["ip", "route", "get", netns.node_ip(1)], capture_output=True, text=True)
    assert r.returncode != 0  # the unreachable safety route is in place


def test_sigterm_tears_the_cluster_down(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys, time, json
        from pathlib import Path
        from tests.harness.cluster import Cluster
        c = Cluster(Path({str(tmp_path / "c")!r}), nodes=1)
        c.up()
        print(json.dumps(c._state()), flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                         text=True)  # fmt: skip
    try:
        assert p.stdout is not None
        state = json.loads(p.stdout.readline())
        assert all(is_alive(d["pid"], d["start_time"]) for d in state["daemons"])
        os.kill(p.pid, signal.SIGTERM)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    time.sleep(0.1)
    assert not any(is_alive(d["pid"], d["start_time"]) for d in state["daemons"])
    assert not set(state["namespaces"]) & set(netns.existing_namespaces())


def test_leftover_daemons_are_stopped_by_teardown_leftovers(tmp_path: Path) -> None:
    from tests.harness.procs import Daemon, stop_leftover_daemons

    d = Daemon.start("sleeper", ["sleep", "60"], tmp_path / "sleep.log")
    d.popen = None  # as if the process that started it had died
    report = stop_leftover_daemons(lambda rec: rec["pid"] == d.pid)
    assert any("sleeper" in line for line in report)
    assert not d.alive()


def test_hack_cluster_up_pull_down(tmp_path: Path) -> None:
    def run(*args: str) -> str:
        argv = [sys.executable, "-m", "hack.cluster", "--state-dir", str(tmp_path / "s"), *args]
        r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout

    tag = ""
    try:
        run("up", "2")
        tag = json.loads((tmp_path / "s" / "state.json").read_text())["tag"]
        out = run("pull", "2", "small")
        assert '"upstream_blob_fetches": 3' in out
        assert "running" in run("status")
    finally:
        run("down")
    assert "down" in run("status")
    assert tag
    assert not [n for n in netns.existing_namespaces() if n.startswith(f"spg-{tag}-")]
