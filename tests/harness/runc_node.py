"""Let a namespace node's containerd run containers with runc.

Why: the harness starts each node's containerd with ``ip netns exec``, which also gives it a mount
namespace with a fresh /sys, without the cgroup hierarchy; runc (started by containerd's shim, in
containerd's namespaces) then fails with "no cgroup mount found in mountinfo".  For a test that
runs a container on a node, this restarts that node's containerd with ``nsenter --net``: the node's
network namespace (so ``ctr run --net-host`` means the node's network, and CRI pulls still reach
the node's 127.0.0.1 mirror) and the host's mount namespace (so runc finds the cgroups).  Same
config, root and socket: content and images survive the restart.

API
- ``restart_for_containers(node, timeout=30.0)``: stop the node's containerd, start it again as
  above, wait until it and its CRI answer.  ``Cluster.down()`` stops it like every node process.
"""

from __future__ import annotations

import os
import socket
import time

from .cluster import Node
from .containerd import Containerd
from .cri import CriClient, CriError
from .procs import Daemon


def restart_for_containers(node: Node, timeout: float = 30.0) -> None:
    c = node.containerd
    if c.netns is None:
        raise ValueError(f"{node.name}: containerd is not in a network namespace")
    c.stop()
    c.socket.unlink(missing_ok=True)
    booted_before = c.log_text().count("containerd successfully booted")
    env = None
    if c.line.bin_dir is not None:  # the shim is found on PATH: the line's own first
        env = {"PATH": f"{c.line.bin_dir}:{os.environ.get('PATH', '')}"}
    argv = ["nsenter", f"--net=/run/netns/{c.netns}", "--",
            c.line.binary("containerd"), "--config", str(c.config_file)]  # fmt: skip
    daemon = Daemon.start(c.name, argv, c.log_path, None, env)
    c.daemon = daemon
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not daemon.alive():
            raise RuntimeError(f"containerd on {node.name} exited at start:\n{c.log_tail()}")
        if c.log_text().count("containerd successfully booted") > booted_before and _answers(c):
            return
        time.sleep(0.05)
    raise RuntimeError(f"containerd on {node.name} not ready after {timeout}s:\n{c.log_tail()}")


def _answers(c: Containerd) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(c.socket))
        CriClient(c.socket).list()
    except (CriError, OSError):
        return False
    return True
