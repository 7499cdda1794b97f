"""Run a container of the DaemonSet with `ctr run`, the way the kubelet would run it.

Why: the image e2e test must run the agent with the DaemonSet's mounts, args, user and security
settings, not with a copy of them that drifts when the manifests change.  This reads the container
(or init container) from the DaemonSet manifest and translates it into `ctr run` arguments, with the
node's host paths replaced by the test node's stand-ins.  Pure: no process is started here.

What is translated: ``command`` and ``args`` (``$(VAR)`` references filled from ``env``; an
unknown one is an error), ``volumeMounts`` of ``hostPath`` volumes (bind mounts; ``readOnly``;
``mountPropagation`` HostToContainer -> rslave, Bidirectional -> rshared), of ``secret`` volumes
(read-only binds of the directory the caller gives for that secret; an optional secret it gives
none for is ``absent_secret_dir``, which should be empty: the kubelet mounts an absent optional
secret as an empty directory) and of in-memory ``emptyDir`` volumes (tmpfs of
``sizeLimit``), ``securityContext`` ``runAsUser``, ``readOnlyRootFilesystem``,
``allowPrivilegeEscalation`` and ``capabilities.drop: [ALL]``.  Anything else that would change how
the container runs (``subPath``, other volume kinds) is refused with a ValueError.

API
- ``pod_container(manifest_text, name, host_paths, env, secret_dirs=None, absent_secret_dir=None)``
  -> ``PodContainer`` (``secret_dirs``: secretName -> directory).
- ``init_container_names(manifest_text)`` -> the init containers, in the order they run.
- ``ctr_run_args(container, image, container_id, entrypoint, extra_args=(), detach=False,
  net_host=False, log_uri=None, image_user=None)`` -> argv after ``ctr [global options]``.
- ``DEFAULT_CAPS``: the capabilities ``ctr run`` grants unless dropped (it has no "ALL").
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

DEFAULT_CAPS = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
)  # fmt: skip
PROPAGATION = {None: "rprivate", "None": "rprivate", "HostToContainer": "rslave",
               "Bidirectional": "rshared"}  # fmt: skip
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_SIZE = re.compile(r"^(\d+)(Ki|Mi|Gi)?$")


@dataclass(frozen=True, slots=True)
class PodContainer:
    """What `ctr run` needs to know about one container of the pod."""

    name: str
    command: tuple[str, ...] | None  # None: the image's entrypoint
    args: tuple[str, ...]
    mounts: tuple[str, ...]  # `ctr run --mount` values
    user: str  # uid:gid
    read_only_root: bool
    drop_all_caps: bool
    no_new_privileges: bool


def _daemonset(manifest_text: str) -> dict[str, Any]:
    for doc in yaml.safe_load_all(manifest_text):
        if isinstance(doc, dict) and doc.get("kind") == "DaemonSet":
            return doc
    raise ValueError("no DaemonSet in the manifest")


def _fill(arg: str, env: Mapping[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        if m.group(1) not in env:
            raise ValueError(f"argument {arg!r} names ${m.group(1)}, which the test does not set")
        return env[m.group(1)]

    return _VAR.sub(one, arg)


def _tmpfs_size(limit: str | None) -> str:
    if limit is None:
        return ""
    m = _SIZE.match(str(limit))
    if not m:
        raise ValueError(f"emptyDir sizeLimit {limit!r} is not understood")
    unit = {"Ki": "k", "Mi": "m", "Gi": "g", None: ""}[m.group(2)]
    return f":size={m.group(1)}{unit}"


def _mount(
    mount: dict[str, Any],
    volume: dict[str, Any],
    host_paths: Mapping[str, str],
    secret_dirs: Mapping[str, str],
    absent_secret_dir: str | None,
) -> str:
    if "subPath" in mount or "subPathExpr" in mount:
        raise ValueError(f"volumeMount {mount['name']}: subPath is not supported")
    dst = mount["mountPath"]
    if "hostPath" in volume:
        path = volume["hostPath"]["path"]
        if path not in host_paths:
            raise ValueError(f"volume {volume['name']}: no stand-in for hostPath {path}")
        access = "ro" if mount.get("readOnly") else "rw"
        propagation = PROPAGATION.get(mount.get("mountPropagation"))
        if propagation is None:
            raise ValueError(f"volumeMount {mount['name']}: {mount['mountPropagation']!r}")
        return f"type=bind,src={host_paths[path]},dst={dst},options=rbind:{access}:{propagation}"
    if "secret" in volume:
        secret = volume["secret"]["secretName"]
        src = secret_dirs.get(secret)
        if src is None and volume["secret"].get("optional"):
            src = absent_secret_dir
        if src is None:
            raise ValueError(f"volume {volume['name']}: no directory for secret {secret}")
        return f"type=bind,src={src},dst={dst},options=rbind:ro:rprivate"
    empty = volume.get("emptyDir")
    if isinstance(empty, dict) and empty.get("medium") == "Memory":
        size = _tmpfs_size(empty.get("sizeLimit"))
        return f"type=tmpfs,src=tmpfs,dst={dst},options=nosuid:nodev{size}"
    raise ValueError(f"volume {volume['name']}: only hostPath, secret and in-memory emptyDir")


def init_container_names(manifest_text: str) -> list[str]:
    pod = _daemonset(manifest_text)["spec"]["template"]["spec"]
    return [c["name"] for c in pod.get("initContainers", [])]


def pod_container(
    manifest_text: str,
    name: str,
    host_paths: Mapping[str, str],
    env: Mapping[str, str],
    secret_dirs: Mapping[str, str] | None = None,
    absent_secret_dir: str | None = None,
) -> PodContainer:
    pod = _daemonset(manifest_text)["spec"]["template"]["spec"]
    candidates = [*pod.get("initContainers", []), *pod.get("containers", [])]
    spec = next((c for c in candidates if c["name"] == name), None)
    if spec is None:
        raise ValueError(f"no container {name!r} in the DaemonSet")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = tuple(
        _mount(m, volumes[m["name"]], host_paths, secret_dirs or {}, absent_secret_dir)
        for m in spec.get("volumeMounts", [])
    )
    security = spec.get("securityContext", {})
    uid = security.get("runAsUser", pod.get("securityContext", {}).get("runAsUser"))
    if uid is None:
        raise ValueError(f"container {name}: no runAsUser (the image's user would be a guess)")
    return PodContainer(
        name=name,
        command=tuple(_fill(str(a), env) for a in spec["command"]) if "command" in spec else None,
        args=tuple(_fill(str(a), env) for a in spec.get("args", [])),
        mounts=mounts,
        user=f"{uid}:{security.get('runAsGroup', uid)}",
        read_only_root=bool(security.get("readOnlyRootFilesystem", False)),
        drop_all_caps="ALL" in security.get("capabilities", {}).get("drop", []),
        no_new_privileges=security.get("allowPrivilegeEscalation") is False,
    )


def ctr_run_args(
    container: PodContainer,
    image: str,
    container_id: str,
    entrypoint: Sequence[str],
    extra_args: Sequence[str] = (),
    detach: bool = False,
    net_host: bool = False,
    log_uri: str | None = None,
    image_user: str | None = None,
) -> list[str]:
    """``ctr run`` replaces the image's entrypoint with whatever follows the id, unlike a pod's
    ``args``: the container's ``command`` goes there, or else ``entrypoint``, the image's own,
    named again by the caller.  ``--user`` is left out when the image's own user (``image_user``)
    is the container's: ctr 1.6 has no such flag."""
    run = ["run"]
    if container.user != image_user:
        run += ["--user", container.user]
    if detach:
        run.append("--detach")
    else:
        run.append("--rm")
    if net_host:
        run.append("--net-host")
    if container.read_only_root:
        run.append("--read-only")
    if not container.no_new_privileges:
        run.append("--allow-new-privs")  # ctr sets no_new_privs unless told otherwise
    if container.drop_all_caps:
        for cap in DEFAULT_CAPS:
            run += ["--cap-drop", cap]
    if log_uri is not None:
        run += ["--log-uri", log_uri]
    for m in container.mounts:
        run += ["--mount", m]
    command = container.command if container.command is not None else tuple(entrypoint)
    return [*run, image, container_id, *command, *container.args, *extra_args]
