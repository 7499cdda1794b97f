"""Run the commands the manifests give `spegla`, as the kubelet would, against a throw-away certs.d.

Why: install and uninstall are where a node's containerd configuration can be lost. This runs the
init container's `spegla configuration` and the cleanup DaemonSet's `spegla cleanup` exactly as
rendered (args, env from the ConfigMap, $(VAR) expansion), with each hostPath mount mapped to a
temporary directory, and checks that a node's own certs.d survives install, pod restart and
uninstall. The cleanup server listens on a free loopback port instead of :8080.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.manifests.kustomize_subset import Object, render
from tests.manifests.test_manifests import MANIFESTS, ROOT, _container_env, _expand, _one

USER_HOSTS = "server = 'https://registry-1.docker.io'\n\n[host.'https://mirror.internal']\n"


def _command(container: Object, objects: list[Object], host_dirs: dict[str, Path]) -> list[str]:
    """The container's argv with every mount path replaced by the temp dir standing in for it."""
    env = _container_env(container, objects)
    mounts = {m["mountPath"]: host_dirs[m["name"]] for m in container.get("volumeMounts", [])}
    args = []
    for arg in container["args"]:
        arg = _expand(arg, env)
        for mount_path, host_dir in mounts.items():
            arg = arg.replace(mount_path, str(host_dir))
        args.append(arg)
    return [sys.executable, "-m", "agent", *args]


def _run(container: Object, objects: list[Object], host_dirs: dict[str, Path]) -> None:
    env = {"PATH": os.environ.get("PATH", ""), **_container_env(container, objects)}
    result = subprocess.run(
        _command(container, objects, host_dirs), cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "cleanup exited before serving"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    pytest.fail(f"{url} never answered 200")


def test_install_restart_and_uninstall_keep_the_nodes_own_certs_d(tmp_path: Path) -> None:
    certs_d = tmp_path / "certs.d"
    (certs_d / "docker.io").mkdir(parents=True)
    (certs_d / "docker.io" / "hosts.toml").write_text(USER_HOSTS)
    host_dirs = {"containerd-certs-d": certs_d}

    objects = render(MANIFESTS)
    init = _one(objects, "DaemonSet", "spegla")["spec"]["template"]["spec"]["initContainers"][0]
    for _ in range(2):  # first install, then the pod starting again on the same node
        _run(init, objects, host_dirs)
        hosts = (certs_d / "_default" / "hosts.toml").read_text()
        assert "[host.'http://10.0.0.11:30020']" in hosts
        assert (certs_d / "_backup" / "docker.io" / "hosts.toml").read_text() == USER_HOSTS

    cleanup_objects = render(MANIFESTS / "cleanup")
    pod = _one(cleanup_objects, "DaemonSet", "spegla-cleanup")["spec"]["template"]["spec"]
    cleanup = pod["containers"][0]
    port = _free_port()
    assert "--addr=:8080" in cleanup["args"]
    args = [a.replace(":8080", f"127.0.0.1:{port}") for a in cleanup["args"]]
    cleanup = {**cleanup, "args": args}
    env = {"PATH": os.environ.get("PATH", ""), **_container_env(cleanup, cleanup_objects)}
    proc = subprocess.Popen(
        _command(cleanup, cleanup_objects, host_dirs), cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        probe = pod["containers"][0]["readinessProbe"]["httpGet"]["path"]
        _wait_ready(f"http://127.0.0.1:{port}{probe}", proc)
        assert sorted(p.name for p in certs_d.iterdir()) == ["docker.io"]
        assert (certs_d / "docker.io" / "hosts.toml").read_text() == USER_HOSTS
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
