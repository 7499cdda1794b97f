"""Run the commands the manifests give `spegla` as the kubelet would, on loopback and temp dirs.

Why: install and uninstall are where a node's containerd configuration can be lost. This runs the
init container's `spegla configuration` and the cleanup DaemonSet's `spegla cleanup` exactly as
rendered (args, env from the ConfigMap, $(VAR) expansion), with each hostPath mount mapped to a
temporary directory, and checks that a node's own certs.d survives install, pod restart and
uninstall. The cleanup server listens on a free loopback port instead of :8080. The agent itself is
started with the DaemonSet's args too, to check what its probes and Prometheus will see.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.manifests.kustomize_subset import Object, render
from tests.manifests.test_manifests import (
    MANIFESTS,
    ROOT,
    _container_env,
    _expand,
    _one,
    init_container,
)

USER_HOSTS = "server = 'https://registry-1.docker.io'\n\n[host.'https://mirror.internal']\n"


def _mapped(text: str, container: Object, host_dirs: dict[str, Path]) -> str:
    """`text` with every mount path replaced by the temp dir standing in for it; a mount
    without one (the cluster key's Secret) maps to a directory that does not exist here."""
    for mount in container.get("volumeMounts", []):
        host_dir = host_dirs.get(mount["name"], Path("/nonexistent-volume") / mount["name"])
        text = text.replace(mount["mountPath"], str(host_dir))
    return text


def _command(container: Object, objects: list[Object], host_dirs: dict[str, Path]) -> list[str]:
    """The container's argv with every mount path replaced by the temp dir standing in for it."""
    env = _container_env(container, objects)
    args = [_mapped(_expand(arg, env), container, host_dirs) for arg in container["args"]]
    return [sys.executable, "-m", "agent", *args]


def _env(container: Object, objects: list[Object], host_dirs: dict[str, Path]) -> dict[str, str]:
    """The container's environment (ConfigMap included), mount paths mapped like the args."""
    env = _container_env(container, objects)
    return {k: _mapped(v, container, host_dirs) for k, v in env.items()}


def _run(
    container: Object,
    objects: list[Object],
    host_dirs: dict[str, Path],
    overrides: dict[str, str] | None = None,
) -> None:
    env = {"PATH": os.environ.get("PATH", ""), **_env(container, objects, host_dirs)}
    env.update(overrides or {})
    result = subprocess.run(
        _command(container, objects, host_dirs),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
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
    # the optional Secret not created yet: kubelet mounts an empty directory
    (tmp_path / "cluster-key").mkdir()
    host_dirs = {"containerd-certs-d": certs_d, "cluster-key": tmp_path / "cluster-key"}

    objects = render(MANIFESTS)
    init = init_container(_one(objects, "DaemonSet", "spegla")["spec"]["template"]["spec"])
    for _ in range(2):  # first install, then the pod starting again on the same node
        _run(init, objects, host_dirs)
        hosts = (certs_d / "_default" / "hosts.toml").read_text()
        assert "http://10.0.0.11:30020" in tomllib.loads(hosts)["host"]
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
        _command(cleanup, cleanup_objects, host_dirs),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
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


def test_prepend_existing_keeps_a_named_registrys_certificates(tmp_path: Path) -> None:
    """The README's advice for nodes with their own certs.d/<registry>/ (a private CA)."""
    certs_d = tmp_path / "certs.d"
    private = certs_d / "registry.internal.example"
    private.mkdir(parents=True)
    (private / "hosts.toml").write_text(
        "[host.'https://registry.internal.example']\nca = 'ca.crt'\n"
    )
    (private / "ca.crt").write_text("certificate\n")
    objects = render(MANIFESTS)
    init = init_container(_one(objects, "DaemonSet", "spegla")["spec"]["template"]["spec"])
    overrides = {
        "PREPEND_EXISTING": "true",
        "MIRRORED_REGISTRIES": "_default,https://registry.internal.example",
    }
    (tmp_path / "cluster-key").mkdir()
    host_dirs = {"containerd-certs-d": certs_d, "cluster-key": tmp_path / "cluster-key"}
    _run(init, objects, host_dirs, overrides)
    assert (private / "ca.crt").read_text() == "certificate\n"
    hosts = (private / "hosts.toml").read_text()
    assert list(tomllib.loads(hosts)["host"]) == [
        "http://10.0.0.11:30020",
        "http://10.0.0.11:30021",
        "https://registry.internal.example",
    ]
    assert (certs_d / "_default" / "hosts.toml").is_file()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_agent_started_with_the_daemonsets_args_answers_its_probes(tmp_path: Path) -> None:
    """`spegla registry` as the DaemonSet runs it, with no containerd and no peer: the process is
    live (startup/liveness probes pass), not ready (it knows no peer), and /metrics already carries
    the series the alerts and dashboard use. Listen addresses move to free loopback ports, and the
    bootstrap is switched off: the DNS bootstrap would query the host's resolver."""
    objects = render(MANIFESTS)
    container = _one(objects, "DaemonSet", "spegla")["spec"]["template"]["spec"]["containers"][0]
    ports = {name: _free_port() for name in ("registry", "router", "metrics")}
    host_dirs = {
        "containerd-sock": tmp_path / "no-containerd.sock",
        "containerd-content": tmp_path / "content",
        "data": tmp_path / "data",
        "tmp": tmp_path / "tmp",
        "containerd-certs-d": tmp_path / "certs.d",
        "containerd-etc": tmp_path / "etc-containerd",
        "cluster-key": tmp_path / "cluster-key",  # the optional Secret not created: empty
    }
    for name in (
        "containerd-content",
        "data",
        "tmp",
        "containerd-certs-d",
        "containerd-etc",
        "cluster-key",
    ):
        host_dirs[name].mkdir()
    addr_flags = {
        "--registry-addr": "registry",
        "--router-addr": "router",
        "--metrics-addr": "metrics",
    }
    args = []
    for arg in container["args"]:
        flag = arg.split("=", 1)[0]
        args.append(f"{flag}=127.0.0.1:{ports[addr_flags[flag]]}" if flag in addr_flags else arg)
    container = {**container, "args": args}
    env = {
        "PATH": os.environ.get("PATH", ""),
        **_env(container, objects, host_dirs),
        "BOOTSTRAP_KIND": "none",
    }
    command = _command(container, objects, host_dirs)
    command = [a.replace("10.244.1.5", "127.0.0.1") for a in command]  # --advertise-addr=$(POD_IP)
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        probes = {p: container[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe")}
        registry = f"http://127.0.0.1:{ports['registry']}"
        _wait_ready(registry + probes["startupProbe"], proc)
        assert _get(registry + container["livenessProbe"]["httpGet"]["path"])[0] == 200
        assert _get(registry + probes["readinessProbe"])[0] != 200, "ready without any peer"
        status, metrics = _get(f"http://127.0.0.1:{ports['metrics']}/metrics")
        assert status == 200
        families = {line.split()[2] for line in metrics.splitlines() if line.startswith("# TYPE")}
        for name in (
            "spegel_mirror_requests_total",
            "spegel_mirror_last_success_timestamp_seconds",
            "spegel_resolve_duration_seconds",
            "spegel_advertised_keys",
            "spegel_advertised_images",
            "http_request_duration_seconds",
            "http_response_size_bytes",
            "http_requests_inflight",
            "process_start_time_seconds",
        ):
            assert name in families, f"{name} not exported"
        assert _get(f"http://127.0.0.1:{ports['metrics']}/debug/tasks")[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == 0, stderr[-2000:]
