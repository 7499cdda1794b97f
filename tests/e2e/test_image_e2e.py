"""End-to-end through the agent image (issue 18, item 4): `make image`'s OCI archive, imported into
containerd (2.x, and Debian's 1.6) on a namespace node and run from there as a container, serves a
peer.

Why: the image is what every node runs; an entrypoint, a missing shared library, a file written to
the read-only root or a mount the DaemonSet gives and the agent does not expect would only show up
on a cluster.  Here node 1's agent runs FROM THE IMAGE (``ctr run`` with runc, host networking in
the node's namespace, and the mounts, args, user, read-only root and dropped capabilities read from
manifests/base/daemonset.yaml by ``tests.harness.ctr_pod``); node 2 runs the agent from the
checkout.  Node 1 pulls an image (upstream), then node 2 pulls it and the
upstream sees no blob fetch from node 2: every blob came from node 1's containerized agent, whose
own log and metrics say it served them.

The archive is built once per source state: cached in the temp dir under a hash of everything the
image contains (the packages, pyproject.toml, README.md, the build script), or taken from
``build/spegla-image.tar`` when that is newer than every source file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.shared import upstream_blobs, wait_served_by_peer
from tests.harness import agents as ag
from tests.harness.cluster import Cluster, Node
from tests.harness.containerd import LINES, NAMESPACE, Line
from tests.harness.ctr_pod import ctr_run_args, init_container_names, pod_container
from tests.harness.fixtures import require_harness, require_line, short_tempdir
from tests.harness.procs import Daemon
from tests.harness.runc_node import restart_for_containers

pytestmark = [pytest.mark.root, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "localhost/spegla:" + re.search(  # type: ignore[union-attr]
    r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M
).group(1)
SOURCES = ("agent", "dht", "registry", "pyproject.toml", "README.md", "hack/build-image.sh")
CACHE = Path(tempfile.gettempdir()) / "spegla-image-cache"
CACHE_KEEP = 3  # archives of other source states kept (other checkouts may be using them)
BUILD_TIMEOUT = 900.0
CONTAINER = "spegla-agent"
DAEMONSET = ROOT / "manifests" / "base" / "daemonset.yaml"
IMAGE_USER = "0:0"  # the image config's (test_archive_names_the_image_and_its_entrypoint)


def source_files() -> list[Path]:
    out: list[Path] = []
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            out += [
                f
                for f in p.rglob("*")
                if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc"
            ]
        else:
            out.append(p)
    return sorted(out)


def source_key(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:24]


def archive_name(path: Path) -> str | None:
    """The image name in an OCI archive's index.json (None when it names none or is unreadable)."""
    try:
        with tarfile.open(path) as archive:
            f = archive.extractfile("index.json")
            manifests = json.load(f)["manifests"] if f is not None else []
    except (OSError, KeyError, ValueError, tarfile.TarError):
        return None
    names = {m.get("annotations", {}).get("io.containerd.image.name") for m in manifests}
    return names.pop() if len(names) == 1 else None


def build_archive() -> Path:
    """The image archive for the checkout's current sources (built if no fresh one exists)."""
    files = source_files()
    made = ROOT / "build" / "spegla-image.tar"
    if made.exists() and made.stat().st_mtime > max(f.stat().st_mtime for f in files):
        if archive_name(made) == IMAGE:  # not one built with another IMAGE=
            return made
    CACHE.mkdir(exist_ok=True)
    cached = CACHE / f"{source_key(files)}.tar"
    if cached.exists():
        return cached
    partial = CACHE / f"{cached.stem}.{os.getpid()}.partial"
    r = subprocess.run(
        ["bash", str(ROOT / "hack" / "build-image.sh")],
        cwd=ROOT, env={**os.environ, "OUT": str(partial)},
        capture_output=True, text=True, timeout=BUILD_TIMEOUT,
    )  # fmt: skip
    if r.returncode != 0:
        partial.unlink(missing_ok=True)
        raise AssertionError(f"hack/build-image.sh failed:\n{r.stderr[-4000:]}")
    partial.rename(cached)
    older = sorted(CACHE.glob("*.tar"), key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in older[CACHE_KEEP + 1 :]:
        stale.unlink(missing_ok=True)
    return cached


@pytest.fixture(scope="session")
def image_archive() -> Path:
    require_harness()
    missing = [t for t in ("mmdebstrap", "umoci", "runc") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing Debian tools: {', '.join(missing)} (run hack/setup.sh as root)")
    return build_archive()


def _blob(archive: tarfile.TarFile, digest: str) -> Any:
    f = archive.extractfile("blobs/" + digest.replace(":", "/"))
    assert f is not None, digest
    return json.load(f)


def test_archive_names_the_image_and_its_entrypoint(image_archive: Path) -> None:
    """What `ctr images import` and `kind load image-archive` tag, and how a pod runs it."""
    with tarfile.open(image_archive) as archive:
        index = json.load(archive.extractfile("index.json"))  # type: ignore[arg-type]
        [entry] = index["manifests"]
        assert entry["annotations"] == {
            "org.opencontainers.image.ref.name": IMAGE,
            "io.containerd.image.name": IMAGE,
        }
        manifest = _blob(archive, entry["digest"])
        config = _blob(archive, manifest["config"]["digest"])
        members = {m.name: m for m in archive.getmembers()}
    assert len(manifest["layers"]) == 2  # Debian, then /opt/spegla
    assert all(f"blobs/sha256/{d['digest'][7:]}" in members for d in manifest["layers"])
    assert config["os"] == "linux"
    assert config["config"]["Entrypoint"] == ["spegla"]
    assert config["config"]["User"] == IMAGE_USER
    assert "PATH=/opt/spegla/bin" in ":".join(config["config"]["Env"])
    labels = config["config"]["Labels"]
    assert labels["org.opencontainers.image.version"] == IMAGE.rsplit(":", 1)[1]


def ctr(node: Node, *args: str, timeout: float = 120.0) -> str:
    argv = node.containerd.ctr("--namespace", NAMESPACE, *args)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed:\n{r.stderr[-2000:]}")
    return r.stdout


def host_paths(node: Node) -> dict[str, str]:
    """The test node's stand-ins for the host paths the DaemonSet mounts.  The containerd
    instance's directory holds its socket (``containerd.sock``) and its ``config.toml``."""
    ctrd = node.containerd
    data = node.workdir / "agent-data"
    data.mkdir(parents=True, exist_ok=True)
    return {
        "/run/containerd": str(ctrd.workdir),
        "/run/containerd/containerd.sock": str(ctrd.socket),
        "/var/lib/containerd/io.containerd.content.v1.content": str(ctrd.content_path),
        "/etc/containerd/certs.d": str(ctrd.certs_d),
        "/etc/containerd": str(ctrd.workdir),
        "/var/lib/spegla": str(data),
    }


def no_secret(node: Node) -> str:
    """What the kubelet mounts for an optional Secret that does not exist: an empty directory."""
    empty = node.workdir / "absent-secret"
    empty.mkdir(exist_ok=True)
    return str(empty)


def configmap_value(name: str) -> str:
    """A setting of the base ConfigMap (the pods read it through envFrom, which `ctr run` lacks)."""
    configmap = yaml.safe_load((DAEMONSET.parent / "configmap.yaml").read_text())
    return str(configmap["data"][name])


def agent_run_args(cluster: Cluster, node: Node) -> list[str]:
    """`ctr run` of the DaemonSet's agent container on `node`, detached, with host networking (the
    node's namespace, where containerd and so its shim run) and its output in the node's
    agent.log.  What the ConfigMap sets in a cluster (bootstrap) is added as flags."""
    env = {"POD_IP": node.ip, "NODE_IP": node.ip}
    # the cluster key Secret holds the key the harness gives the checkout's agents
    key_dir = str(ag.cluster_key_file(cluster, create=True).parent)
    spec = pod_container(
        DAEMONSET.read_text(), "registry", host_paths(node), env,
        secret_dirs={"spegla-cluster-key": key_dir}, absent_secret_dir=no_secret(node),
    )  # fmt: skip
    peers = [f"{n.ip}:{ag.ROUTER_PORT}" for n in cluster.nodes if n is not node]
    extra = ["--log-level=DEBUG",  # the access lines: which blob went to which peer
             "--cluster-key-file", configmap_value("CLUSTER_KEY_FILE"),
             "--bootstrap-kind=static", "--static-bootstrap-peers", *peers]  # fmt: skip
    return ctr_run_args(
        spec, IMAGE, CONTAINER, ["spegla"], extra, detach=True, net_host=True,
        log_uri=f"file://{node.workdir / 'agent.log'}", image_user=IMAGE_USER,
    )  # fmt: skip


def task_pid(node: Node) -> int:
    for line in ctr(node, "task", "ls").splitlines()[1:]:
        cols = line.split()
        if cols and cols[0] == CONTAINER:
            return int(cols[1])
    raise AssertionError(f"no task {CONTAINER} on {node.name}")


def remove_container(node: Node) -> None:
    """Kill and delete the task and the container (the shim outlives containerd otherwise)."""
    for args in (("task", "delete", "--force", CONTAINER), ("container", "delete", CONTAINER)):
        subprocess.run(node.containerd.ctr("--namespace", NAMESPACE, *args),
                       capture_output=True, timeout=60)  # fmt: skip


@pytest.fixture(scope="module", params=LINES, ids=[line.id for line in LINES])
def c(request: pytest.FixtureRequest, image_archive: Path) -> Iterator[Cluster]:
    """Two nodes on one containerd line: node 1's agent from the image, node 2's from the
    checkout."""
    line: Line = request.param
    require_line(line)
    cl = Cluster(short_tempdir("spg-image-"), nodes=2, line=line)
    n1 = cl.node(1)
    adopted: list[Daemon] = []
    try:
        cl.up(large_mib=1)
        restart_for_containers(n1)
        ctr(n1, "images", "import", str(image_archive), timeout=300)
        ctr(n1, *agent_run_args(cl, n1))
        # the agent and its shim outlive containerd: recorded, a killed run's are found
        pid = task_pid(n1)
        shim = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        log = n1.workdir / "agent.log"
        adopted += [Daemon.adopt("image-agent-n1", pid, log),
                    Daemon.adopt("image-agent-shim-n1", shim, log)]  # fmt: skip
        ag.start_agent(cl, cl.node(2), ready_timeout=None)
        try:
            ag.wait_ready(n1, timeout=60)
        except TimeoutError as e:
            tail = log.read_text(errors="replace")[-3000:]
            raise AssertionError(f"{e}\n{ctr(n1, 'task', 'ls')}\ncontainer log:\n{tail}") from e
        ag.wait_ready(cl.node(2), timeout=30, daemon=cl.node(2).processes["agent"])
        cl.configure_mirrors(ag.REGISTRY_PORT)
        yield cl
    finally:
        remove_container(n1)
        for d in adopted:
            d.stop()
        cl.down()


def test_agent_runs_from_the_image_as_the_daemonset_runs_it(c: Cluster) -> None:
    n1 = c.node(1)
    pid = task_pid(n1)
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    assert status["Uid"].split() == ["0", "0", "0", "0"]
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
    assert int(status["NoNewPrivs"]) == 1
    # the image's interpreter and console script, not the checkout's
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[0].startswith(b"/opt/spegla/bin/python"), cmdline
    assert cmdline[1:3] == [b"/opt/spegla/bin/spegla", b"registry"], cmdline
    assert "VERSION_CODENAME=bookworm" in Path(f"/proc/{pid}/root/etc/os-release").read_text()
    root_mount = next(
        line.split() for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
        if line.split()[4] == "/"
    )  # fmt: skip
    assert "ro" in root_mount[5].split(","), root_mount
    # its JSON log lines reach the node's log through the container's stdout
    assert ag.agent_log(n1), (n1.workdir / "agent.log").read_text()[-2000:]


def test_peer_pull_served_by_the_agent_in_the_image(c: Cluster) -> None:
    assert c.images is not None
    img, ref = c.images.small, c.ref("small")
    n1, n2 = c.node(1), c.node(2)
    mark = c.upstream.mark()
    n1.pull(ref)
    assert upstream_blobs(c, n1, mark) == set(img.blob_digests())
    wait_served_by_peer(n2, f"e2e/{img.name}", img.blob_digests(), timeout=30)
    served_before = ag.peer_serves(n1)
    hits_before, _ = ag.mirror_counts(n2)
    mark2 = c.upstream.mark()
    assert n2.pull(ref).image_id == img.for_platform().config.digest
    assert upstream_blobs(c, n2, mark2) == set()
    assert all(n2.containerd.has_blob(d) for d in img.blob_digests())
    assert ag.mirror_counts(n2)[0] > hits_before
    assert ag.peer_serves(n1) > served_before
    for d in img.blob_digests():
        assert n1 in ag.served_to(c, d, n2.ip), d


def test_init_containers_run_from_the_image(c: Cluster) -> None:
    """Every init container of the DaemonSet, in order, from the image, on a node set up right:
    each exits 0, and `configuration` writes the node's certs.d (a directory of this test's own
    here, not the one the node's containerd reads)."""
    n1 = c.node(1)
    certs = n1.workdir / "init-certs.d"
    certs.mkdir()
    paths = {**host_paths(n1), "/etc/containerd/certs.d": str(certs)}
    manifest = DAEMONSET.read_text()
    names = init_container_names(manifest)
    assert "configuration" in names
    out = ""
    for name in names:
        env = {"NODE_IP": n1.ip}
        spec = pod_container(manifest, name, paths, env, absent_secret_dir=no_secret(n1))
        argv = ctr_run_args(spec, IMAGE, f"spegla-init-{name}", ["spegla"], image_user=IMAGE_USER)
        out += ctr(n1, *argv)
    written = certs / "_default" / "hosts.toml"
    hosts = tomllib.loads(written.read_text())
    assert list(hosts["host"]) == [f"http://{n1.ip}:30020", f"http://{n1.ip}:30021"], out
    assert written.stat().st_uid == 0


def test_kind_load_import_tags_the_image(c: Cluster, image_archive: Path) -> None:
    """`kind load image-archive` streams the archive into this command on every node; the image
    must come out under the name the manifests use (node 2 has not imported it yet)."""
    n2 = c.node(2)
    assert IMAGE not in ctr(n2, "images", "ls", "--quiet").split()
    argv = n2.containerd.ctr("--namespace", NAMESPACE, "images", "import", "--all-platforms",
                             "--digests", "--snapshotter=overlayfs", "-")  # fmt: skip
    with image_archive.open("rb") as archive:
        r = subprocess.run(argv, stdin=archive, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert IMAGE in ctr(n2, "images", "ls", "--quiet").split()


def test_agent_in_the_image_stops_on_sigterm(c: Cluster) -> None:
    """What the kubelet sends at a rollout: the agent exits by itself, within the grace period."""
    n1 = c.node(1)
    pid = task_pid(n1)
    ctr(n1, "task", "kill", "--signal", "SIGTERM", CONTAINER)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists(), "agent still running 30 s after SIGTERM"
    assert "STOPPED" in ctr(n1, "task", "ls")
