"""What an operator meets first: the image reference, a node whose containerd is elsewhere, the
NodePort-only variant, and the install/uninstall commands the README gives.

Why: these are the places where an install fails without a useful message (ImagePullBackOff on a
placeholder, a pod stuck in ContainerCreating on k3s, an uninstall that pulls another image). The
containerd-check script is run with the real /bin/sh against a real Unix socket in a temp dir.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.manifests.kustomize_subset import Object, render
from tests.manifests.test_manifests import MANIFESTS, ROOT, _one, init_container

IMAGE_COMPONENT = MANIFESTS / "image" / "kustomization.yaml"


def _pod(objects: list[Object], daemonset: str) -> Object:
    spec: Object = _one(objects, "DaemonSet", daemonset)["spec"]["template"]["spec"]
    return spec


def _containers(pod: Object) -> list[Object]:
    return list(pod.get("initContainers", [])) + list(pod["containers"])


def test_the_image_is_set_in_one_place_for_install_and_cleanup() -> None:
    (entry,) = yaml.safe_load(IMAGE_COMPONENT.read_text())["images"]
    expected = f"{entry['newName']}:{entry['newTag']}"
    assert expected == "localhost/spegla:0.1.0"  # what `make image` builds (docs/image.md)
    for directory, daemonset in ((MANIFESTS, "spegla"), (MANIFESTS / "cleanup", "spegla-cleanup")):
        for container in _containers(_pod(render(directory), daemonset)):
            assert container["image"] == expected, (directory.name, container["name"])
            # a loaded archive must be enough: no pull when the node has the image
            assert container["imagePullPolicy"] == "IfNotPresent", container["name"]
    entries = [
        path
        for path in MANIFESTS.rglob("kustomization.yaml")
        if "images" in (yaml.safe_load(path.read_text()) or {})
    ]
    assert entries == [IMAGE_COMPONENT], "set the image in manifests/image only"


def test_an_images_entry_in_an_overlay_reaches_every_container(tmp_path: Path) -> None:
    """What the README tells users with their own registry to write, for install and cleanup."""
    for target, daemonset in (("base", "spegla"), ("cleanup", "spegla-cleanup")):
        overlay = tmp_path / target
        overlay.mkdir()
        (overlay / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "resources": [str(MANIFESTS / target)],
                    "images": [
                        {
                            "name": "localhost/spegla",
                            "newName": "registry.internal.example/spegla",
                            "newTag": "0.1.0",
                        }
                    ],
                }
            )
        )
        images = {c["image"] for c in _containers(_pod(render(overlay), daemonset))}
        assert images == {"registry.internal.example/spegla:0.1.0"}, target


# --- containerd-check: a clear failure where containerd's socket is not at the mounted path ---


def _check_command(tmp_path: Path) -> tuple[list[str], Path]:
    pod = _pod(render(MANIFESTS), "spegla")
    check = init_container(pod, "containerd-check")
    assert pod["initContainers"][0] is check, "the check must run before anything is written"
    assert check["terminationMessagePolicy"] == "FallbackToLogsOnError"
    (mount,) = check["volumeMounts"]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    agent_mount = next(
        m for m in pod["containers"][0]["volumeMounts"] if m["name"] == mount["name"]
    )
    assert agent_mount["mountPath"] == mount["mountPath"] == volume["hostPath"]["path"]
    host_dir = tmp_path / "run-containerd"
    host_dir.mkdir()
    # no heredoc: shells may back it with a temp file, and the root filesystem is read-only
    assert "<<" not in check["args"][0]
    script = check["args"][0].replace(mount["mountPath"], str(host_dir))
    return [*check["command"], script], host_dir


def test_containerd_check_passes_when_the_socket_is_there(tmp_path: Path) -> None:
    command, host_dir = _check_command(tmp_path)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(host_dir / "containerd.sock"))
        server.listen()
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stderr == ""


@pytest.mark.parametrize("leftover", ["nothing", "a plain file"])
def test_containerd_check_fails_with_what_to_do_on_k3s(tmp_path: Path, leftover: str) -> None:
    command, host_dir = _check_command(tmp_path)
    if leftover == "a plain file":
        (host_dir / "containerd.sock").write_text("")
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    for needed in (
        "/run/k3s/containerd/containerd.sock",
        "embedded registry mirror",
        "manifests/examples/k0s",
        "hostPath of volume containerd-sock",
    ):
        assert needed in result.stderr, needed


def test_the_agent_reads_the_socket_inside_the_checked_directory() -> None:
    pod = _pod(render(MANIFESTS), "spegla")
    (flag,) = [a for a in pod["containers"][0]["args"] if a.startswith("--containerd-sock=")]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "containerd-sock")
    assert flag == f"--containerd-sock={mount['mountPath']}/containerd.sock"
    assert mount["readOnly"] is True
    # the directory holds running containers' mounts: without HostToContainer (rslave) the pod
    # would keep each finished container's rootfs mounted in its own mount namespace
    for container in _containers(pod):
        for volume_mount in container.get("volumeMounts", []):
            if volume_mount["name"] == "containerd-sock":
                assert volume_mount["mountPropagation"] == "HostToContainer", container["name"]


# --- components/node-port-local ---


def test_node_port_local_sends_containerd_to_the_service_only() -> None:
    objects = render(MANIFESTS / "examples" / "node-port-local")
    pod = _pod(objects, "spegla")
    assert not [p for c in pod["containers"] for p in c.get("ports", []) if "hostPort" in p]
    service = _one(objects, "Service", "spegla-registry")["spec"]
    assert service["trafficDistribution"] == "PreferSameNode"
    assert service["type"] == "NodePort" and service["externalTrafficPolicy"] == "Cluster"
    target = f"http://$(NODE_IP):{service['ports'][0]['nodePort']}"
    assert f"--mirror-targets={target}" in init_container(pod)["args"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["MIRROR_TARGETS"] == target  # what doctor compares hosts.toml with
    base = _one(render(MANIFESTS), "Service", "spegla-registry")["spec"]
    assert "trafficDistribution" not in base


def test_node_port_local_states_its_trade_offs() -> None:
    text = (MANIFESTS / "components" / "node-port-local" / "kustomization.yaml").read_text()
    for fact in ("1.33", "1.34", "Ready", "30021"):
        assert fact in text, fact


# --- the README's commands ---


def _readme_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match is not None, f"no sh block under {heading}"
    return match.group(1)


def test_readme_uninstall_stops_agents_then_restores_then_deletes() -> None:
    lines = [
        line.split("#")[0].strip()
        for line in _readme_block("Uninstall").splitlines()
        if line.strip()
    ]
    order = [
        "kubectl -n spegla delete daemonset spegla --cascade=foreground",
        "kubectl apply -k manifests/cleanup/",
        "kubectl -n spegla rollout status daemonset/spegla-cleanup --timeout=5m",
        "kubectl delete -k manifests/cleanup/",
        "kubectl delete -k manifests/ --ignore-not-found",
    ]
    assert lines == order
    for path in ("manifests/cleanup/", "manifests/"):
        assert (ROOT / path / "kustomization.yaml").is_file()


def test_readme_says_how_a_configmap_change_reaches_the_agents() -> None:
    text = (ROOT / "README.md").read_text()
    assert "kubectl -n spegla rollout restart ds/spegla" in text
    assert "rollout restart ds/spegla" in (MANIFESTS / "base" / "configmap.yaml").read_text()


# containerd 1.x (Debian's package) and 2.x (built for the tests, beside the checkout)
_CONTAINERD_1 = shutil.which("containerd")
_CONTAINERD_2 = sorted((ROOT.parent / "shared" / "containerd").glob("2.*/containerd"))
_PLUGIN = {3: ("io.containerd.cri.v1.images", ""), 2: ("io.containerd.grpc.v1.cri", "containerd")}


def _readme_snippet(version: int) -> str:
    text = (ROOT / "README.md").read_text()
    marker = f"(config `version = {version}`):\n\n```toml\n"
    return text.split(marker, 1)[1].split("```", 1)[0]


def _dump(binary: str, version: int, snippet: str, tmp_path: Path) -> dict[str, Any]:
    """`containerd config dump` of a file of `version` that discards layers and has no
    config_path, importing the README's snippet (containerd merges imports over the file)."""
    plugin, section = _PLUGIN[version]
    where = f'[plugins."{plugin}".{section}]' if section else f'[plugins."{plugin}"]'
    (tmp_path / "snippet.toml").write_text(f"version = {version}\n{snippet}")
    config = tmp_path / "config.toml"
    config.write_text(
        f"version = {version}\nimports = ['{tmp_path / 'snippet.toml'}']\n"
        f"{where}\n  discard_unpacked_layers = true\n"
    )
    out = subprocess.run(
        [binary, "--config", str(config), "config", "dump"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return tomllib.loads(out)


@pytest.mark.skipif(not _CONTAINERD_2, reason="no containerd 2.x in ../shared/containerd/")
def test_readme_version_3_settings_are_what_containerd_2_reads(tmp_path: Path) -> None:
    dump = _dump(str(_CONTAINERD_2[-1]), 3, _readme_snippet(3), tmp_path)
    images = dump["plugins"]["io.containerd.cri.v1.images"]
    assert images["discard_unpacked_layers"] is False
    assert images["registry"]["config_path"] == "/etc/containerd/certs.d"  # one directory


@pytest.mark.skipif(_CONTAINERD_1 is None, reason="Debian's containerd 1.x not installed")
def test_readme_version_2_settings_are_what_containerd_1_reads(tmp_path: Path) -> None:
    assert _CONTAINERD_1 is not None
    version = subprocess.run(
        [_CONTAINERD_1, "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    if " 1." not in version:
        pytest.skip(f"containerd on PATH is not 1.x: {version.strip()}")
    dump = _dump(_CONTAINERD_1, 2, _readme_snippet(2), tmp_path)
    cri = dump["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["containerd"]["discard_unpacked_layers"] is False
    assert cri["registry"]["config_path"] == "/etc/containerd/certs.d"


def test_readme_push_instructions_change_the_image_of_install_and_cleanup(tmp_path: Path) -> None:
    """Run the README's edit of manifests/image on a copy of manifests/, then render both."""
    text = (ROOT / "README.md").read_text()
    block = text.split("### 3. Put the image on the nodes", 1)[1].split("### 4.", 1)[0]
    (edit,) = [b for b in re.findall(r"```sh\n(.*?)```", block, re.S) if "manifests/image" in b]
    command = "\n".join(line for line in edit.splitlines() if not line.startswith("skopeo "))
    pushed = re.search(r"docker://(\S+):(\S+)", edit)
    assert pushed is not None
    copy = tmp_path / "checkout"
    shutil.copytree(MANIFESTS, copy / "manifests")
    subprocess.run(["sh", "-c", command], cwd=copy, check=True, timeout=30)
    want = f"{pushed.group(1)}:{pushed.group(2)}"
    for directory, daemonset in (("manifests", "spegla"), ("manifests/cleanup", "spegla-cleanup")):
        images = {c["image"] for c in _containers(_pod(render(copy / directory), daemonset))}
        assert images == {want}, directory
