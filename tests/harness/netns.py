"""Network namespaces for a multi-node cluster on one machine, with the safety net in place.

Why: each "node" needs its own address and loopback (containerd's mirror is ``127.0.0.1`` of its
node), and the test traffic must never leave the machine.  The topology is a switch namespace
holding a bridge, one namespace for the upstream registry and one per node, all on 10.213.0.0/24.
Nothing is added to the root namespace except ``unreachable 10.213.0.0/24``, kept for as long as any
``spg-`` namespace exists; the namespaces get no default route.  veth pairs are created inside the
switch namespace, so no interface ever appears in the root namespace.

API
- ``SUBNET``, ``UPSTREAM_IP``, ``node_ip(i)`` (i from 1).
- ``Topology(tag, nodes)``: ``.switch``, ``.upstream``, ``.node(i)`` names (``spg-<tag>-sw`` ...),
  ``.all_namespaces``; ``.commands()`` -> the ``ip`` argv lists that build it (pure).
- ``create(topology)``, ``destroy(namespaces)``, ``limit_rate(netns, mbit, dev="eth0")``.
- ``ensure_safety_route()``, ``drop_safety_route_if_unused()``, ``existing_namespaces(prefix)``,
  ``pids_in(netns)``.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

PREFIX = "spg-"
SUBNET = "10.213.0.0/24"
UPSTREAM_IP = "10.213.0.2"


def node_ip(i: int) -> str:
    if not 1 <= i <= 200:
        raise ValueError(f"node index out of range: {i}")
    return f"10.213.0.{10 + i}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


@dataclass(frozen=True, slots=True)
class Topology:
    tag: str
    nodes: int

    @property
    def switch(self) -> str:
        return f"{PREFIX}{self.tag}-sw"

    @property
    def upstream(self) -> str:
        return f"{PREFIX}{self.tag}-up"

    def node(self, i: int) -> str:
        return f"{PREFIX}{self.tag}-n{i}"

    @property
    def members(self) -> list[tuple[str, str, str]]:
        """(namespace, veth name on the switch side, address) of every host on the bridge."""
        out = [(self.upstream, "v-up", UPSTREAM_IP)]
        out += [(self.node(i), f"v-n{i}", node_ip(i)) for i in range(1, self.nodes + 1)]
        return out

    @property
    def all_namespaces(self) -> list[str]:
        return [self.switch] + [ns for ns, _, _ in self.members]

    def commands(self) -> list[list[str]]:
        sw = self.switch
        cmds = [["netns", "add", ns] for ns in self.all_namespaces]
        cmds += [
            ["-n", sw, "link", "set", "lo", "up"],
            ["-n", sw, "link", "add", "br0", "type", "bridge"],
            ["-n", sw, "link", "set", "br0", "up"],
        ]
        for ns, veth, addr in self.members:
            cmds += [
                [
                    "-n",
                    sw,
                    "link",
                    "add",
                    veth,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    ns,
                ],
                ["-n", sw, "link", "set", veth, "master", "br0", "up"],
                ["-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0"],
                ["-n", ns, "link", "set", "eth0", "up"],
                ["-n", ns, "link", "set", "lo", "up"],
            ]
        return cmds


def ensure_safety_route() -> None:
    """Root namespace: anything to the test subnet fails at once instead of going outside."""
    _ip("route", "replace", "unreachable", SUBNET)


def existing_namespaces(prefix: str = PREFIX) -> list[str]:
    r = _ip("netns", "list", check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.startswith(prefix)]


def drop_safety_route_if_unused() -> bool:
    """Remove the unreachable route once no ``spg-`` namespace is left.  Returns True if removed."""
    if existing_namespaces():
        return False
    r = _ip("route", "show", "type", "unreachable", SUBNET, check=False)
    if r.stdout.strip():
        _ip("route", "del", "unreachable", SUBNET, check=False)
        return True
    return False


def create(topology: Topology) -> None:
    ensure_safety_route()
    try:
        for cmd in topology.commands():
            _ip(*cmd)
    except Exception:
        destroy(topology.all_namespaces)
        raise


def pids_in(netns: str) -> list[int]:
    r = _ip("netns", "pids", netns, check=False)
    return [int(p) for p in r.stdout.split() if p.isdigit()]


def destroy(namespaces: list[str]) -> list[str]:
    """Delete the namespaces (veths go with them).  Returns warnings, e.g. leftover processes."""
    warnings = []
    present = set(existing_namespaces(""))
    for ns in namespaces:
        if ns not in present:
            continue
        left = pids_in(ns)
        if left:
            warnings.append(f"{ns}: processes still inside: {left}")
        _ip("netns", "del", ns, check=False)
    drop_safety_route_if_unused()
    return warnings


def limit_rate(netns: str, mbit: float, dev: str = "eth0") -> None:
    """Egress limit on ``dev`` of ``netns`` (tbf; the kernel has no netem)."""
    subprocess.run(
        ["ip", "netns", "exec", netns, "tc", "qdisc", "replace", "dev", dev, "root",
         "tbf", "rate", f"{mbit}mbit", "burst", "256kb", "latency", "100ms"],
        check=True, capture_output=True,
    )  # fmt: skip


def clear_rate(netns: str, dev: str = "eth0") -> None:
    subprocess.run(
        ["ip", "netns", "exec", netns, "tc", "qdisc", "del", "dev", dev, "root"],
        capture_output=True,
    )
