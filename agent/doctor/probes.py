"""`spegla doctor`: gathers, on the node it runs on, the facts `agent.doctor.checks` judges.

Why this shape: every probe is a small Trio function with its own time budget (cancel scopes), and
none of them can fail the run: a probe that cannot get its fact reports why, and the check built on
it fails with that reason. The probes only read: containerd's version and CRI status over its
socket, containerd 2.x's config files (`agent.containerd.config_files`; the root file is the one on
containerd's own command line when its process is visible, else --containerd-config), files under
certs.d and the content directory, the agent's own ports on this machine, and a TCP connect to
peers' registry port. The DHT port is probed with one datagram the agent drops as malformed (a
real DHT request would put the doctor into the agent's routing table) and confirmed by the agent's
`spegla_dht_datagrams_received_total` going up.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import struct
from dataclasses import dataclass, field

import trio

from agent.config import ListenAddr
from agent.containerd.config_files import read_settings, split_host_path
from agent.doctor import checks as dc

DEFAULT_CONTAINERD_CONFIG = "/etc/containerd/config.toml"
PROBE_DATAGRAM = b"spegla doctor probe (not a DHT message)"
MAX_STATS_BODY = 8 << 20


@dataclass(frozen=True, slots=True)
class DoctorConfig:
    containerd_sock: str = "/run/containerd/containerd.sock"
    containerd_config: str = DEFAULT_CONTAINERD_CONFIG
    config_path: str = "/etc/containerd/certs.d"
    content_path: str = "/var/lib/containerd/io.containerd.content.v1.content"
    registry_addr: ListenAddr = field(default_factory=lambda: ListenAddr("", 5000))
    router_addr: ListenAddr = field(default_factory=lambda: ListenAddr("", 5001))
    metrics_addr: ListenAddr = field(default_factory=lambda: ListenAddr("", 9090))
    mirrored_registries: tuple[str, ...] = ()
    mirror_targets: tuple[str, ...] = ()
    standalone: bool = False
    timeout: float = 2.0  # per probe
    max_peers: int = 8  # peers tried for the registry-port check
    cluster_key_file: str = ""


def _local(addr: ListenAddr) -> str:
    """Where this machine reaches a listener bound to `addr` (an empty/any host: loopback)."""
    return addr.host if addr.host and addr.host not in ("0.0.0.0", "::") else "127.0.0.1"


def _url(host: str, port: int, path: str) -> str:
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}{path}"


def local_addresses() -> list[str]:
    """IP addresses of this network namespace (from /proc: no extra tools in the image)."""
    out = {"127.0.0.1", "::1", "localhost"}
    try:
        with open("/proc/net/fib_trie") as fh:
            lines = fh.read().splitlines()
        for prev, line in itertools.pairwise(lines):
            if line.strip() == "/32 host LOCAL":
                out.add(prev.strip().split()[-1])
    except OSError:
        pass
    try:
        with open("/proc/net/if_inet6") as fh:
            lines = fh.read().splitlines()
        for line in lines:
            raw = line.split()[0]
            out.add(socket.inet_ntop(socket.AF_INET6, bytes.fromhex(raw)))
    except (OSError, ValueError):
        pass
    return sorted(out)


# --- containerd ---------------------------------------------------------------------------------


@dataclass(slots=True)
class ContainerdFacts:
    version: str | None = None
    error: str | None = None
    cri: dc.CriImageConfig | None = None
    cri_error: str = "containerd did not report its CRI configuration"


async def containerd_facts(cfg: DoctorConfig) -> ContainerdFacts:
    from google.protobuf import empty_pb2

    from agent.containerd.client import ContainerdUnavailable, check_socket
    from agent.containerd.grpc_bridge import open_grpc_channel
    from agent.proto import containerd_version_grpc, cri_runtime_grpc, cri_runtime_pb2

    facts = ContainerdFacts()
    try:
        check_socket(cfg.containerd_sock)
    except ContainerdUnavailable as exc:
        facts.error = str(exc)
        return facts
    info: dict[str, str] = {}
    async with open_grpc_channel(cfg.containerd_sock) as channel:
        try:
            with trio.fail_after(cfg.timeout):
                reply = await channel.unary(
                    containerd_version_grpc.VersionStub(channel.channel).Version,
                    empty_pb2.Empty(),
                )
            facts.version = str(reply.version)
        except trio.TooSlowError:
            facts.error = f"no answer within {cfg.timeout} s"
            return facts
        except Exception as exc:
            facts.error = str(exc) or type(exc).__name__
            return facts
        try:
            with trio.fail_after(cfg.timeout):
                status = await channel.unary(
                    cri_runtime_grpc.RuntimeServiceStub(channel.channel).Status,
                    cri_runtime_pb2.StatusRequest(verbose=True),
                )
            info = dict(status.info)
        except trio.TooSlowError:
            facts.cri_error = f"CRI status: no answer within {cfg.timeout} s"
        except Exception as exc:  # CRI plugin disabled, not initialised, ...
            facts.cri_error = f"CRI status failed: {getattr(exc, 'message', None) or exc}"
    facts.cri = dc.from_cri_info(info)
    if facts.cri is None and info and (dc.major_version(facts.version) or 0) >= 2:
        located = await trio.to_thread.run_sync(locate_config, cfg)  # a socket connect, /proc
        settings = await trio.to_thread.run_sync(read_settings, located.path, located.host_root)
        if not settings.files:
            facts.cri_error = (
                f"containerd {facts.version} does not report image settings over CRI and its "
                f"config ({located.how}) cannot be read: {'; '.join(settings.errors)}; point "
                "--containerd-config (CONTAINERD_CONFIG) at containerd's config file"
            )
            return facts
        if settings.errors:
            facts.cri_error = "config files not fully read: " + "; ".join(settings.errors)
            return facts
        facts.cri = dc.from_settings(settings)
    return facts


@dataclass(frozen=True, slots=True)
class LocatedConfig:
    path: str  # the host's path of containerd's root config file
    host_root: str  # where the host's files are read ("" or "/host" or "/proc/PID/root")
    how: str  # for messages


def config_flag(argv: list[str]) -> str | None:
    """The `--config`/`-c` value of a containerd command line (None: the default file)."""
    for i, arg in enumerate(argv):
        for flag in ("--config", "-config", "-c", "--c"):
            if arg == flag and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(flag + "="):
                return arg[len(flag) + 1 :]
    return None


def containerd_pid(sock_path: str) -> int | None:
    """The PID of the process serving `sock_path`, when it is visible in this PID namespace."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            s.connect(sock_path)
            raw = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid = struct.unpack("3i", raw)[0]
    return pid if pid > 0 else None  # 0: the server lives in a PID namespace we cannot see


def locate_config(cfg: DoctorConfig) -> LocatedConfig:
    """containerd's own command line names its config when its process is visible (the host, a
    hostPID pod): then its files are read through /proc/PID/root, as containerd sees them.
    Otherwise --containerd-config, host paths read under /host when it points there (the
    DaemonSet mounts the host's /etc/containerd at /host/etc/containerd)."""
    pid = containerd_pid(cfg.containerd_sock)
    if pid is not None:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
            path = config_flag(argv) or DEFAULT_CONTAINERD_CONFIG
            if not os.path.isabs(path):
                path = os.path.join(os.readlink(f"/proc/{pid}/cwd"), path)
            return LocatedConfig(path, f"/proc/{pid}/root", f"{path} from containerd's pid {pid}")
        except OSError:
            pass
    host_root = "/host" if cfg.containerd_config.startswith("/host/") else ""
    path = split_host_path(cfg.containerd_config, host_root)
    where = f" (read under {host_root})" if host_root else ""
    return LocatedConfig(path, host_root, f"{path}{where} from --containerd-config")


# --- files --------------------------------------------------------------------------------------


def hosts_files(cfg: DoctorConfig) -> list[dc.HostsFile]:
    from agent.config import ConfigError
    from agent.node.hosts_toml import DEFAULT_REGISTRY, registry_dir_name

    out: list[dc.HostsFile] = []
    for registry in cfg.mirrored_registries or (DEFAULT_REGISTRY,):
        try:
            name = registry_dir_name(registry)
        except ConfigError as exc:
            out.append(dc.HostsFile(registry, registry, None, str(exc)))
            continue
        path = os.path.join(cfg.config_path, name, "hosts.toml")
        try:
            with open(path, encoding="utf-8") as fh:
                out.append(dc.HostsFile(name, path, fh.read()))
        except FileNotFoundError:
            out.append(dc.HostsFile(name, path, None))
        except OSError as exc:
            out.append(dc.HostsFile(name, path, None, exc.strerror or str(exc)))
    return out


def content_facts(path: str) -> tuple[int | None, str | None]:
    """(blob count, None) when the content directory and a blob in it can be read; (None, None)
    when it does not exist yet but containerd's root does."""
    if not path:
        return 0, None
    try:
        os.listdir(path)
    except FileNotFoundError:
        # containerd 2.x creates the directory at its first pull (1.6 at start); the agent
        # picks it up once it appears. Only a missing parent means the mount is wrong.
        parent = os.path.dirname(os.path.normpath(path))
        if os.path.isdir(parent):
            return None, None
        return None, f"neither it nor {parent} exists"
    except OSError as exc:
        return None, f"cannot list it: {exc.strerror}"
    blobs = os.path.join(path, "blobs", "sha256")
    try:
        names = os.listdir(blobs)
    except FileNotFoundError:
        return 0, None  # nothing pulled yet
    except OSError as exc:
        return None, f"cannot list {blobs}: {exc.strerror}"
    if names:
        try:
            with open(os.path.join(blobs, names[0]), "rb") as fh:
                fh.read(1)
        except OSError as exc:
            return None, f"cannot read blobs: {exc.strerror}"
    return len(names), None


# --- the agent's ports --------------------------------------------------------------------------


@dataclass(slots=True)
class AgentFacts:
    registry_error: str | None = "not probed"
    metrics_error: str | None = "not probed"
    dht_error: str | None = "not probed"
    metrics_text: str = ""
    peers: list[tuple[str, int]] | None = None
    peers_error: str | None = None
    peer_tried: list[str] = field(default_factory=list)
    peer_reached: str | None = None
    peer_errors: list[str] = field(default_factory=list)


async def _get(url: str, budget: float) -> tuple[int, bytes]:
    from agent.node.bootstrap import http_get

    with trio.fail_after(budget):
        status, body, _ = await http_get(url, max_body=MAX_STATS_BODY)
    return status, body


def _why(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "no answer in time"
    while isinstance(exc, OSError) and exc.strerror is None and exc.__cause__ is not None:
        exc = exc.__cause__  # trio's "all attempts to connect ... failed" wraps the real reason
    if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        return _why(exc.exceptions[0])
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            try:
                return float(line.rsplit(" ", 1)[1])
            except ValueError:
                return None
    return None


async def _probe_dht(cfg: DoctorConfig, facts: AgentFacts) -> None:
    """One malformed datagram; closed ports answer ICMP unreachable (ECONNREFUSED on recv)."""
    host, port = _local(cfg.router_addr), cfg.router_addr.port
    before = _metric(facts.metrics_text, "spegla_dht_datagrams_received_total")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    with sock:
        try:
            await sock.connect((host, port))
            await sock.send(PROBE_DATAGRAM)
            with trio.move_on_after(min(0.3, cfg.timeout)):
                await sock.recv(2048)  # nothing comes back from a live agent
        except OSError as exc:
            facts.dht_error = _why(exc)
            return
    if before is None:  # no counter to confirm with; no ICMP refusal came back either
        facts.dht_error = None
        return
    with trio.move_on_after(cfg.timeout):
        while True:
            try:
                metrics_url = _url(_local(cfg.metrics_addr), cfg.metrics_addr.port, "/metrics")
                _, body = await _get(metrics_url, cfg.timeout)
            except (OSError, trio.TooSlowError):
                break
            after = _metric(body.decode(errors="replace"), "spegla_dht_datagrams_received_total")
            if after is not None and after > before:
                facts.dht_error = None
                return
            await trio.sleep(0.05)
    facts.dht_error = "the agent did not count the probe datagram"


async def agent_facts(cfg: DoctorConfig) -> AgentFacts:
    facts = AgentFacts()
    reg = (_local(cfg.registry_addr), cfg.registry_addr.port)
    met = (_local(cfg.metrics_addr), cfg.metrics_addr.port)
    try:
        status, _ = await _get(_url(*reg, "/livez"), cfg.timeout)
        facts.registry_error = None if status == 200 else f"/livez answered {status}"
    except Exception as exc:
        facts.registry_error = _why(exc)
    try:
        status, body = await _get(_url(*met, "/metrics"), cfg.timeout)
        facts.metrics_error = None if status == 200 else f"/metrics answered {status}"
        facts.metrics_text = body.decode(errors="replace") if status == 200 else ""
    except Exception as exc:
        facts.metrics_error = _why(exc)
    await _probe_dht(cfg, facts)
    await _peer_facts(cfg, facts)
    return facts


async def _peer_facts(cfg: DoctorConfig, facts: AgentFacts) -> None:
    met = (_local(cfg.metrics_addr), cfg.metrics_addr.port)
    try:
        status, body = await _get(_url(*met, "/debug/web/stats"), cfg.timeout)
        if status != 200:
            raise ValueError(f"/debug/web/stats answered {status}")
        snapshot = json.loads(body)
        facts.peers = [
            (str(p["host"]), int(p.get("port", 0)))
            for p in snapshot.get("peers", [])
            if isinstance(p, dict) and p.get("host")
        ]
    except Exception as exc:
        table = _metric(facts.metrics_text, "spegla_dht_routing_table_size")
        if table is None:
            facts.peers_error = (
                "the metrics port does not answer"
                if facts.metrics_error
                else f"neither /debug/web/stats nor /metrics told ({_why(exc)})"
            )
            return
        facts.peers = [("", 0)] * int(table)  # the count is known, the addresses are not
        return
    await _reach_peers(cfg, facts)


async def _reach_peers(cfg: DoctorConfig, facts: AgentFacts) -> None:
    port = cfg.registry_addr.port
    candidates = [host for host, _ in (facts.peers or []) if host][: cfg.max_peers]

    async def connect(host: str) -> None:
        label = f"{'[' + host + ']' if ':' in host else host}:{port}"
        facts.peer_tried.append(label)
        try:
            with trio.fail_after(cfg.timeout):
                stream = await trio.open_tcp_stream(host, port)
            await stream.aclose()
            if facts.peer_reached is None:
                facts.peer_reached = label
        except (OSError, trio.TooSlowError) as exc:
            facts.peer_errors.append(f"{label} {_why(exc)}")

    async with trio.open_nursery() as nursery:
        for host in candidates:
            nursery.start_soon(connect, host)


# --- the run ------------------------------------------------------------------------------------


async def run_checks(cfg: DoctorConfig) -> list[dc.Check]:
    async with trio.open_nursery() as nursery:
        results: dict[str, object] = {}

        async def gather_containerd() -> None:
            results["containerd"] = await containerd_facts(cfg)

        async def gather_agent() -> None:
            results["agent"] = await agent_facts(cfg)

        nursery.start_soon(gather_containerd)
        nursery.start_soon(gather_agent)
    ctr = results["containerd"]
    agent = results["agent"]
    assert isinstance(ctr, ContainerdFacts) and isinstance(agent, AgentFacts)
    version = dc.version_tuple(ctr.version or "")
    major = version[0] if version else None
    count, content_error = content_facts(cfg.content_path)
    peers = None if agent.peers is None else len(agent.peers)
    reg = f"{_local(cfg.registry_addr)}:{cfg.registry_addr.port}"
    checks = [dc.check_containerd(ctr.version, ctr.error, cfg.containerd_sock)]
    if ctr.version is not None:
        checks.append(dc.check_config_path(ctr.cri, cfg.config_path, version, ctr.cri_error))
        checks.append(dc.check_discard(ctr.cri, major, ctr.cri_error))
    checks += [
        dc.check_hosts_toml(
            hosts_files(cfg), cfg.mirror_targets, local_addresses(), cfg.registry_addr.port
        ),
        dc.check_port("registry port", f"tcp {reg}", agent.registry_error, "/livez"),
        dc.check_port(
            "dht port",
            f"udp {_local(cfg.router_addr)}:{cfg.router_addr.port}",
            agent.dht_error,
            "(the agent received the probe datagram)",
        ),
        dc.check_port(
            "metrics port",
            f"tcp {_local(cfg.metrics_addr)}:{cfg.metrics_addr.port}",
            agent.metrics_error,
            "/metrics",
        ),
        dc.check_peers(
            peers, agent.peers_error, cfg.standalone, agent_down=agent.metrics_error is not None
        ),
    ]
    if agent.peers_error is None:
        checks.append(
            dc.check_peer_registry(agent.peer_tried, agent.peer_reached, agent.peer_errors, peers)
        )
    checks.append(dc.check_content(cfg.content_path, count, content_error))
    checks.append(cluster_key_check(cfg.cluster_key_file))
    return checks


def cluster_key_check(path: str) -> dc.Check:
    """Reads the key file the way the agent does (`agent.node.setup.read_cluster_key`)."""
    from agent.config import ConfigError
    from agent.node.setup import read_cluster_key

    try:
        return dc.check_cluster_key(path, read_cluster_key(path) is not None, None)
    except ConfigError as exc:
        return dc.check_cluster_key(path, False, str(exc))


def doctor_main(cfg: DoctorConfig, *, as_json: bool = False) -> int:
    """Print the report; 0 when every check passed, 1 otherwise."""
    import shutil
    import sys

    checks = trio.run(run_checks, cfg)
    if as_json:
        print(dc.render_json(checks))
    else:
        width = shutil.get_terminal_size((120, 24)).columns
        print(dc.render_table(checks, width=max(80, width)))
    sys.stdout.flush()
    return 0 if dc.passed(checks) else 1
