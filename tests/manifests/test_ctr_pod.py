"""The DaemonSet read as `ctr run` arguments (tests/harness/ctr_pod.py), without running anything.

Why: the image e2e test runs the agent with whatever this translation makes of the manifests; a
mount or security setting silently dropped or mistranslated there would make that test pass for a
pod the kubelet never runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.ctr_pod import DEFAULT_CAPS, ctr_run_args, init_container_names, pod_container

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
EMPTY = "/t/empty"  # for optional Secrets, which the tests do not create


def _mount_to(mounts: tuple[str, ...], dst: str) -> str:
    [m] = [m for m in mounts if f",dst={dst}," in m]
    return m


def test_agent_container_runs_as_root_read_only_without_capabilities() -> None:
    agent = pod_container(DAEMONSET, "registry", HOST, ENV, absent_secret_dir=EMPTY)
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
    init = pod_container(
        DAEMONSET, "configuration", HOST, {"NODE_IP": "10.213.0.12"}, absent_secret_dir=EMPTY
    )
    assert init.args[0] == "configuration"
    assert "--mirror-targets=http://10.213.0.12:30020,http://10.213.0.12:30021" in init.args
    assert ":rw:" in _mount_to(init.mounts, "/etc/containerd/certs.d")


def test_ctr_run_args_keep_every_setting() -> None:
    agent = pod_container(DAEMONSET, "registry", HOST, ENV, absent_secret_dir=EMPTY)
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
        pod_container(DAEMONSET, "registry", paths, ENV, absent_secret_dir=EMPTY)


def test_an_unset_variable_in_args_is_refused() -> None:
    with pytest.raises(ValueError, match=r"POD_IP"):
        pod_container(
            DAEMONSET, "registry", HOST, {"NODE_IP": "10.213.0.11"}, absent_secret_dir=EMPTY
        )


def test_sub_path_and_unknown_containers_are_refused() -> None:
    with_sub_path = DAEMONSET.replace(
        "mountPath: /var/lib/spegla\n", "mountPath: /var/lib/spegla\n              subPath: x\n", 1
    )
    assert with_sub_path != DAEMONSET
    with pytest.raises(ValueError, match="subPath"):
        pod_container(with_sub_path, "registry", HOST, ENV, absent_secret_dir=EMPTY)
    with pytest.raises(ValueError, match="no container 'nope'"):
        pod_container(DAEMONSET, "nope", HOST, ENV, absent_secret_dir=EMPTY)


POD = """
kind: DaemonSet
spec:
  template:
    spec:
      initContainers:
        - name: check
          command: ["/bin/sh", "-c"]
          args: ["test -S $(SOCK)"]
          securityContext: {runAsUser: 0}
          volumeMounts:
            - {name: key, mountPath: /etc/key, readOnly: true}
      containers:
        - name: main
          securityContext: {runAsUser: 1000, runAsGroup: 2000}
      volumes:
        - name: key
          secret: {secretName: the-key, optional: true}
"""


def test_command_replaces_the_entrypoint_and_secrets_are_read_only_directories() -> None:
    check = pod_container(POD, "check", {}, {"SOCK": "/run/s"}, absent_secret_dir="/t/empty")
    assert check.command == ("/bin/sh", "-c") and check.args == ("test -S /run/s",)
    assert check.mounts == ("type=bind,src=/t/empty,dst=/etc/key,options=rbind:ro:rprivate",)
    argv = ctr_run_args(check, "img", "id", ["spegla"])
    assert argv[argv.index("img") :] == ["img", "id", "/bin/sh", "-c", "test -S /run/s"]
    given = pod_container(POD, "check", {}, {"SOCK": "/s"}, secret_dirs={"the-key": "/t/key"})
    assert given.mounts[0].startswith("type=bind,src=/t/key,")
    with pytest.raises(ValueError, match="no directory for secret the-key"):
        pod_container(POD, "check", {}, {"SOCK": "/s"})
    main = pod_container(POD, "main", {}, {})
    assert main.user == "1000:2000" and main.command is None
    assert not (main.read_only_root or main.drop_all_caps or main.no_new_privileges)
    assert "--allow-new-privs" in ctr_run_args(main, "img", "id", ["spegla"])
    argv = ctr_run_args(main, "img", "id", ["spegla"])
    assert argv[argv.index("--user") + 1] == "1000:2000"
    # the image's own user needs no flag (ctr 1.6 has none)
    assert "--user" not in ctr_run_args(check, "img", "id", ["spegla"], image_user="0:0")


def test_init_containers_in_order() -> None:
    assert init_container_names(POD) == ["check"]
    assert "configuration" in init_container_names(DAEMONSET)
