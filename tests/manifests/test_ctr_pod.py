"""The DaemonSet read as `ctr run` arguments (tests/harness/ctr_pod.py), without running anything.

Why: the image e2e test runs the agent with whatever this translation makes of the manifests; a
mount or security setting silently dropped or mistranslated there would make that test pass for a
pod the kubelet never runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.ctr_pod import DEFAULT_CAPS, ctr_run_args, pod_container

ROOT = Path(__file__).resolve().parents[2]
DAEMONSET = (ROOT / "manifests" / "base" / "daemonset.yaml").read_text()
HOST = {
    "/run/containerd": "/t/ctrd",
    "/run/containerd/containerd.sock": "/t/ctrd/containerd.sock",
    "/var/lib/containerd/io.containerd.content.v1.content": "/t/ctrd/root/content",
    "/etc/containerd/certs.d": "/t/ctrd/certs.d",
    "/etc/containerd": "/t/ctrd",
    "/var/lib/spegla": "/t/data",
}
ENV = {"POD_IP": "10.213.0.11", "NODE_IP": "10.213.0.11"}


def _mount_to(mounts: tuple[str, ...], dst: str) -> str:
    [m] = [m for m in mounts if f",dst={dst}," in m]
    return m


def test_agent_container_runs_as_root_read_only_without_capabilities() -> None:
    agent = pod_container(DAEMONSET, "registry", HOST, ENV)
    assert agent.user == "0:0"
    assert agent.read_only_root and agent.drop_all_caps and agent.no_new_privileges
    assert agent.args[0] == "registry"
    assert "--advertise-addr=10.213.0.11" in agent.args
    assert not any("$(" in a for a in agent.args)
    content = _mount_to(agent.mounts, "/var/lib/containerd/io.containerd.content.v1.content")
    assert content.startswith("type=bind,src=/t/ctrd/root/content,") and ":ro:" in content
    assert ":rw:" in _mount_to(agent.mounts, "/var/lib/spegla")
    tmp = _mount_to(agent.mounts, "/tmp")
    assert tmp.startswith("type=tmpfs,") and tmp.endswith(":size=16m")


def test_init_container_writes_certs_d_for_this_node() -> None:
    init = pod_container(DAEMONSET, "configuration", HOST, {"NODE_IP": "10.213.0.12"})
    assert init.args[0] == "configuration"
    assert "--mirror-targets=http://10.213.0.12:30020,http://10.213.0.12:30021" in init.args
    assert ":rw:" in _mount_to(init.mounts, "/etc/containerd/certs.d")


def test_ctr_run_args_keep_every_setting() -> None:
    agent = pod_container(DAEMONSET, "registry", HOST, ENV)
    argv = ctr_run_args(agent, "localhost/spegla:0.1.0", "a", ["spegla"], ["--x"], detach=True,
                        net_host=True, log_uri="file:///t/agent.log")  # fmt: skip
    assert argv[0] == "run" and "--detach" in argv and "--rm" not in argv
    assert {"--net-host", "--read-only"} <= set(argv)
    assert "--allow-new-privs" not in argv
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--cap-drop"] == list(DEFAULT_CAPS)
    assert argv.count("--mount") == len(agent.mounts)
    tail = argv[argv.index("localhost/spegla:0.1.0") :]
    assert tail == ["localhost/spegla:0.1.0", "a", "spegla", *agent.args, "--x"]


def test_a_host_path_without_stand_in_is_refused() -> None:
    paths = {k: v for k, v in HOST.items() if k != "/var/lib/spegla"}
    with pytest.raises(ValueError, match="no stand-in for hostPath /var/lib/spegla"):
        pod_container(DAEMONSET, "registry", paths, ENV)


def test_an_unset_variable_in_args_is_refused() -> None:
    with pytest.raises(ValueError, match=r"POD_IP"):
        pod_container(DAEMONSET, "registry", HOST, {"NODE_IP": "10.213.0.11"})


def test_sub_path_and_unknown_containers_are_refused() -> None:
    with_sub_path = DAEMONSET.replace(
        "mountPath: /var/lib/spegla\n", "mountPath: /var/lib/spegla\n              subPath: x\n", 1
    )
    assert with_sub_path != DAEMONSET
    with pytest.raises(ValueError, match="subPath"):
        pod_container(with_sub_path, "registry", HOST, ENV)
    with pytest.raises(ValueError, match="no container 'nope'"):
        pod_container(DAEMONSET, "nope", HOST, ENV)
