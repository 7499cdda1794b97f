"""`spegla doctor`'s decisions: what each check concludes from facts gathered on the node, and how
the report is printed.

Why a separate, I/O-free module: every way a node silently turns spegla into a no-op (containerd
ignoring certs.d, discarding layers after unpack, a hosts.toml pointing elsewhere, closed ports, no
peers, an unreadable content directory) is a pure function from a fact to a `Check`, tested without
a node. `agent.doctor.probes` gathers the facts (containerd over gRPC, the agent over HTTP/UDP,
files).

containerd 1.6 and 1.7 report their effective CRI configuration in the verbose CRI `Status` (what
`crictl info` prints: `registry.configPath`, `containerd.discardUnpackedLayers`); 2.x does not
report image settings there, so they come from its config files read the way containerd reads
them (`agent.containerd.config_files`). On 2.1+ CRI pulls go through the transfer service unless
`use_local_image_pull = true`, and that path takes `config_path` as ONE directory: a `:`-joined
list (2.1's default among them) silently ignores every hosts.toml, so that is a failure here.
"""

from __future__ import annotations

import itertools
import json
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

from agent.containerd import snippets as snippets
from agent.containerd.config_files import ImageSettings


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the report: `ok` decides the exit code; `fix` says what to do when not ok."""

    name: str
    ok: bool
    result: str
    fix: str = ""
    warning: bool = False  # ok, but less safe or useful than it should be (shown, exit code 0)


@dataclass(frozen=True, slots=True)
class CriImageConfig:
    """The containerd settings spegla depends on, and where they were read from."""

    source: str  # "CRI status (containerd 1.x)", "config files /etc/containerd/config.toml", ...
    config_path: str | None  # None: not set anywhere
    discard_unpacked_layers: bool | None  # None: containerd did not say
    use_local_image_pull: bool | None = None  # 2.x only; None: not set (off)
    config_version: int | None = None  # of the config file read (2.x), for the fix snippets
    config_path_from: str | None = None  # the file that sets config_path last


def version_tuple(version: str) -> tuple[int, int] | None:
    """`v1.6.20` / `1.6.20~ds1` / `2.2.7` -> (1, 6) / (1, 6) / (2, 2); None when unparseable."""
    parts = version.strip().lstrip("v").split(".")
    digits = ["".join(itertools.takewhile(str.isdigit, p)) for p in parts[:2]]
    if len(digits) < 2 or not all(digits):
        head = digits[0] if digits else ""
        return (int(head), 0) if head else None
    return int(digits[0]), int(digits[1])


def major_version(version: str) -> int | None:
    parsed = version_tuple(version)
    return parsed[0] if parsed else None


def transfer_service_pulls(version: tuple[int, int] | None, cfg: CriImageConfig | None) -> bool:
    """containerd 2.1+ does CRI pulls through its transfer service unless told not to."""
    local = cfg is not None and bool(cfg.use_local_image_pull)
    return version is not None and version >= (2, 1) and not local


def from_cri_info(info: Mapping[str, str]) -> CriImageConfig | None:
    """Image settings from the CRI status `info` (1.6/1.7 shape); None when it has none (2.x)."""
    raw = info.get("config")
    if raw is None:
        return None
    try:
        config = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(config, dict):
        return None
    registry = config.get("registry")
    runtime = config.get("containerd")
    if not isinstance(registry, dict) or "configPath" not in registry:
        return None
    discard = runtime.get("discardUnpackedLayers") if isinstance(runtime, dict) else None
    path = registry.get("configPath")
    return CriImageConfig(
        source="CRI status",
        config_path=str(path) if path is not None else None,
        discard_unpacked_layers=bool(discard) if isinstance(discard, bool) else None,
    )


def from_settings(s: ImageSettings) -> CriImageConfig:
    """What containerd 2.x's config files say; unset means containerd's built-in default
    (``discard_unpacked_layers`` and ``use_local_image_pull`` false, ``config_path`` not ours)."""
    files = ", ".join(s.files) if s.files else "no file"
    path = s.config_path.value
    discard = s.discard_unpacked_layers.value
    local = s.use_local_image_pull.value
    return CriImageConfig(
        source=f"config files {files}",
        config_path=str(path) if path is not None else None,
        discard_unpacked_layers=bool(discard) if discard is not None else False,
        use_local_image_pull=bool(local) if local is not None else None,
        config_version=s.version or None,
        config_path_from=s.config_path.source,
    )


# --- checks -------------------------------------------------------------------------------------


def check_containerd(version: str | None, error: str | None, sock: str) -> Check:
    if version is not None:
        return Check("containerd", True, f"reachable at {sock}, version {version}")
    return Check(
        "containerd",
        False,
        f"not reachable at {sock}: {error}",
        "start containerd, or point --containerd-sock (CONTAINERD_SOCK) at its socket "
        "(in the pod: the hostPath mount of /run/containerd/containerd.sock)",
    )


def _snippet_version(cfg: CriImageConfig | None, major: int | None) -> int:
    if cfg is not None and cfg.config_version:
        return 3 if cfg.config_version >= 3 else 2
    return snippets.config_version_for(major)


def _block(text: str) -> str:
    """A config snippet as indented lines under a fix (kept verbatim by `render_table`)."""
    return "\n" + "\n".join("    " + line for line in text.splitlines() if line.strip())


def check_config_path(
    cfg: CriImageConfig | None,
    certs_d: str,
    version: tuple[int, int] | None,
    missing: str = "containerd did not report its CRI configuration",
) -> Check:
    name = "registry config_path"
    major = version[0] if version else None
    config_version = _snippet_version(cfg, major)
    snippet = snippets.config_path_only(config_version, certs_d)
    fix = (
        f"set config_path to the one directory {certs_d} in containerd's config and restart "
        "containerd (without it containerd never reads spegla's hosts.toml):" + _block(snippet)
    )
    if cfg is None:
        return Check(name, False, missing, fix)
    where = f" (set in {cfg.config_path_from})" if cfg.config_path_from else f" ({cfg.source})"
    if not cfg.config_path:
        return Check(name, False, f"not set ({cfg.source})", fix)
    paths = [p for p in cfg.config_path.split(":") if p]
    want = os.path.normpath(certs_d)
    if not any(os.path.normpath(p) == want for p in paths):
        return Check(
            name,
            False,
            f"{cfg.config_path}{where} does not include {certs_d}, where spegla writes hosts.toml",
            fix + "\nor point the `configuration` init container's "
            "--containerd-registry-config-path at the directory containerd reads",
        )
    if len(paths) > 1 and transfer_service_pulls(version, cfg):
        return Check(
            name,
            False,
            f"{cfg.config_path}{where} lists {len(paths)} directories: containerd 2.1+ pulls for "
            "CRI through its transfer service, which takes config_path as ONE directory, so it "
            "reads no hosts.toml and never asks spegla",
            fix
            + "\nor keep the list and make CRI pull without the transfer service:"
            + _block(snippets.local_image_pull(config_version)),
        )
    return Check(name, True, f"{cfg.config_path}{where}")


def check_discard(
    cfg: CriImageConfig | None, major: int | None, missing: str = "containerd did not report it"
) -> Check:
    name = "discard_unpacked_layers"
    fix = (
        "set discard_unpacked_layers = false and restart containerd (with true, containerd "
        "deletes layers after unpacking and this node has nothing to share):"
        + _block(snippets.discard_only(_snippet_version(cfg, major)))
    )
    if cfg is None or cfg.discard_unpacked_layers is None:
        return Check(name, False, missing, fix)
    if cfg.discard_unpacked_layers:
        return Check(name, False, f"true ({cfg.source})", fix)
    return Check(name, True, f"false ({cfg.source})")


@dataclass(frozen=True, slots=True)
class HostsFile:
    """One certs.d/<registry>/hosts.toml as found on disk."""

    registry_dir: str
    path: str
    text: str | None  # None: missing
    error: str = ""  # unreadable


def mirror_hosts(text: str) -> list[str]:
    """The `[host."<url>"]` URLs of a hosts.toml, in file order (raises ValueError on bad TOML)."""
    hosts = tomllib.loads(text).get("host", {})
    return [str(url) for url in hosts] if isinstance(hosts, dict) else []


def _same_endpoint(url: str, target: str) -> bool:
    a, b = urlsplit(url.rstrip("/")), urlsplit(target.rstrip("/"))
    return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)


def points_at_agent(url: str, targets: Sequence[str], local_ips: Sequence[str], port: int) -> bool:
    """A mirror URL is this agent's when it is a configured mirror target, or (no targets given)
    an address of this machine on the agent's registry port."""
    if targets:
        return any(_same_endpoint(url, t) for t in targets)
    parts = urlsplit(url)
    return parts.hostname in local_ips and parts.port == port


def check_hosts_toml(
    files: Sequence[HostsFile], targets: Sequence[str], local_ips: Sequence[str], port: int
) -> Check:
    name = "hosts.toml"
    rerun = (
        "re-run the `configuration` init container (kubectl -n spegla rollout restart ds/spegla)"
    )
    problems: list[str] = []
    good: list[str] = []
    for f in files:
        if f.error:
            problems.append(f"{f.path}: {f.error}")
            continue
        if f.text is None:
            problems.append(f"{f.path} is missing")
            continue
        try:
            hosts = mirror_hosts(f.text)
        except ValueError as exc:
            problems.append(f"{f.path} is not valid TOML ({exc})")
            continue
        if not hosts:
            problems.append(f"{f.path} lists no [host] mirror")
        elif not points_at_agent(hosts[0], targets, local_ips, port):
            want = ", ".join(targets) if targets else f"this node's address, port {port}"
            problems.append(f"{f.path}: first mirror is {hosts[0]}, not this agent ({want})")
        else:
            good.append(f"{f.registry_dir} -> {hosts[0]}")
    if problems:
        return Check(name, False, "; ".join(problems), rerun)
    return Check(name, True, "; ".join(good))


def check_port(name: str, addr: str, error: str | None, what: str) -> Check:
    if error is None:
        return Check(name, True, f"{addr} answers {what}")
    return Check(
        name,
        False,
        f"{addr}: {error}",
        "is the agent running on this node? see `kubectl -n spegla logs ds/spegla`; check the "
        "port flags (--registry-addr, --router-addr, --metrics-addr)",
    )


def check_peers(
    count: int | None, error: str | None, standalone: bool, agent_down: bool = False
) -> Check:
    name = "dht peers"
    if count is None:
        fix = (
            "start the agent first (see the port checks)"
            if agent_down
            else "enable the debug page (--debug-web-enabled)"
        )
        return Check(name, False, f"unknown: {error}", fix)
    if count == 0 and not standalone:
        return Check(
            name,
            False,
            "0 peers: this node can neither find nor share content",
            "check the bootstrap settings (BOOTSTRAP_KIND and its address) and that UDP to the "
            "router port is allowed between nodes; a one-node cluster runs with --standalone",
        )
    return Check(name, True, f"{count} peer(s)" + (" (standalone)" if standalone else ""))


def check_peer_registry(
    tried: Sequence[str], reached: str | None, errors: Sequence[str], peers: int | None
) -> Check:
    name = "peer registry port"
    if reached is not None:
        return Check(name, True, f"{reached} accepts TCP")
    if not tried:
        if peers == 0:
            return Check(name, True, "no peer to try")
        return Check(
            name, False, "peer addresses unknown", "enable the debug page (--debug-web-enabled)"
        )
    return Check(
        name,
        False,
        f"none of {len(tried)} peer(s) accepts TCP: {'; '.join(errors[:3])}",
        "allow TCP to the registry port between nodes (NetworkPolicy, security groups, "
        "host firewall)",
    )


def check_content(path: str, entries: int | None, error: str | None) -> Check:
    name = "content directory"
    if not path:
        return Check(name, True, "not used (blobs stream over containerd's gRPC API)")
    if error is None and entries is None:
        return Check(
            name, True, f"{path} not created yet (containerd 2.x creates it at its first pull)"
        )
    if error is None:
        return Check(name, True, f"{path} readable ({entries} blob(s))")
    return Check(
        name,
        False,
        f"{path}: {error}",
        "mount containerd's content directory read-only at --containerd-content-path "
        "(k0s and Talos keep it elsewhere: patch the hostPath), or set it empty to stream over "
        "gRPC",
    )


def check_cluster_key(path: str, present: bool, error: str | None) -> Check:
    """The cluster key: without it the agent is open to any pod and resolves no tag
    through peers; a key file that exists but cannot be used stops the agent from starting."""
    name = "cluster key"
    if error is not None:
        return Check(
            name,
            False,
            error,
            "the key must be 16 to 4096 bytes: kubectl -n spegla create secret generic "
            'spegla-cluster-key --from-literal=key="$(openssl rand -base64 32)"',
        )
    if present:
        return Check(name, True, f"{path}: agents authenticate each other; tags via peers")
    return Check(
        name,
        True,
        f"no key at {path or '(--cluster-key-file not set)'}: any pod can join the DHT, and "
        "tags are never resolved through peers (digests still are, verified)",
        "kubectl -n spegla create secret generic spegla-cluster-key "
        '--from-literal=key="$(openssl rand -base64 32)", then restart the agents '
        "(kubectl -n spegla rollout restart ds/spegla)",
        warning=True,
    )


# --- output -------------------------------------------------------------------------------------


def passed(checks: Sequence[Check]) -> bool:
    return all(c.ok for c in checks)


def render_table(checks: Sequence[Check], width: int = 100) -> str:
    """check / result / what to do: one row per check, its result wrapped in the result column and,
    for a failed check, what to do on the lines under it (so long paths stay readable)."""
    import textwrap

    name_w = max(len("CHECK"), *(len(c.name) for c in checks))
    indent = " " * (name_w + 6)
    result_w = max(30, width - len(indent))
    lines = [f"{'CHECK':<{name_w}}  {'':2}  RESULT / what to do", "-" * min(width, 100)]
    for c in checks:
        mark = "!!" if not c.ok else "??" if c.warning else "ok"
        result = textwrap.wrap(c.result, result_w, break_on_hyphens=False) or [""]
        lines.append(f"{c.name:<{name_w}}  {mark}  {result[0]}")
        lines += [indent + more for more in result[1:]]
        if c.fix:  # prose is wrapped; indented lines (config snippets) are kept as they are
            for n, part in enumerate(c.fix.split("\n")):
                if part.startswith(" "):
                    lines.append(indent + part)
                else:
                    text = ("-> " if n == 0 else "") + part
                    wrapped = textwrap.wrap(text, result_w, break_on_hyphens=False)
                    lines += [indent + w for w in wrapped]
    failed = sum(1 for c in checks if not c.ok)
    warned = sum(1 for c in checks if c.ok and c.warning)
    lines.append("")
    lines.append(
        "all checks passed" if not failed else f"{failed} of {len(checks)} check(s) failed"
    )
    if warned:
        lines[-1] += f" ({warned} warning(s): ??)"
    return "\n".join(lines)


def render_json(checks: Sequence[Check]) -> str:
    return json.dumps({"ok": passed(checks), "checks": [asdict(c) for c in checks]}, indent=2)
