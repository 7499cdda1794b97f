"""What the agent derives from its configuration before it runs: the address it advertises, how it
finds its first peers, the cluster key and the registry's credentials.

Why its own module: these read the host (its addresses, key and secret files) and turn a bad value
into a `ConfigError`; `agent.cli.main` checks them before starting (a bad flag fails at once) and
`agent.runtime.run` uses them while it wires the services.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from agent.config import ConfigError, RegistryConfig
from agent.node.bootstrap import (
    Bootstrapper,
    DnsBootstrap,
    HttpBootstrap,
    KubernetesBootstrap,
    NoBootstrap,
    SelfInfo,
    StaticBootstrap,
)
from registry.auth.basic import BasicAuth
from registry.auth.peer import MIN_KEY_BYTES

MAX_KEY_BYTES = 4096

__all__ = [
    "detect_advertise_addr",
    "make_bootstrapper",
    "more_addresses",
    "read_basic_auth",
    "read_cluster_key",
    "read_psk",
    "trust_summary",
]


def detect_advertise_addr(cfg: RegistryConfig) -> str:
    """The IP peers should use for us: the flag, else a routable-looking address of this host."""
    if cfg.advertise_addr:
        return cfg.advertise_addr
    if cfg.router_addr.host and cfg.router_addr.host not in ("0.0.0.0", "::"):
        return cfg.router_addr.host
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, type=socket.SOCK_DGRAM)
    except OSError:
        return ""
    addrs = [str(info[4][0]) for info in infos]
    for addr in addrs:
        if not addr.startswith("127.") and addr != "::1":
            return addr
    return addrs[0] if addrs else ""


def more_addresses(cfg: RegistryConfig, advertised: str) -> tuple[str, ...]:
    """The IPs named in our provider records beside the one our DHT datagrams come from.

    Choice: they are configured (`--advertise-more-addrs`, e.g. the pod's `status.podIPs` on a
    dual-stack cluster), not guessed from the host's interfaces: an agent cannot tell which of
    its addresses its peers can route to, and a wrong one costs every peer a dial stagger.  The
    advertised address itself is left out (the record has it already), so a single-stack pod
    given its one IP sends exactly what older agents understand.
    """
    return tuple(dict.fromkeys(a for a in cfg.advertise_more_addrs if a != advertised))


def make_bootstrapper(cfg: RegistryConfig, me: SelfInfo) -> Bootstrapper:
    boot = cfg.bootstrap
    if boot.kind == "static":
        return StaticBootstrap(boot.static_peers)
    if boot.kind == "dns":
        return DnsBootstrap(boot.dns_domain, me.port)
    if boot.kind == "http":
        return HttpBootstrap(me, boot.http_addr, boot.http_url)
    if boot.kind == "kubernetes":
        from agent.config import HostPort
        from agent.node.lease import LeaseElector, make_api_client

        if not me.host:
            raise ConfigError("--bootstrap-kind=kubernetes needs --advertise-addr (the pod IP)")
        identity = str(HostPort(me.host, me.port))
        elector = LeaseElector(
            make_api_client(boot.kubeconfig), boot.lease_name, boot.lease_namespace, identity
        )
        return KubernetesBootstrap(elector, me.port)
    return NoBootstrap()


def read_basic_auth(directory: str) -> BasicAuth | None:
    """The registry's Basic auth credentials (None: off); unusable files are a ConfigError."""
    from registry.auth.basic import BasicAuthError, load_basic_auth

    try:
        return load_basic_auth(directory)
    except BasicAuthError as exc:
        raise ConfigError(f"--basic-auth-dir: {exc}") from None


def read_cluster_key(path: str) -> bytes | None:
    """The cluster key in `path` (surrounding whitespace dropped); None without one.

    No key: an empty `path`, or a file missing from a directory that exists (the base manifests
    mount the Secret `optional`, so before it is created the directory is there and empty).
    A ConfigError: a missing directory (a mistyped path), an unreadable file, or a key that is
    empty, shorter than 16 bytes or longer than 4096.
    """
    if not path:
        return None
    try:
        with open(path, "rb") as fh:
            key = fh.read(MAX_KEY_BYTES + 1).strip()
    except FileNotFoundError:
        if os.path.isdir(os.path.dirname(path) or "."):
            return None
        raise ConfigError(f"--cluster-key-file {path}: no such file or directory") from None
    except OSError as exc:
        raise ConfigError(f"cannot read --cluster-key-file {path}: {exc.strerror}") from None
    if not key:
        raise ConfigError(f"--cluster-key-file {path} is empty")
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"--cluster-key-file {path} must hold at least {MIN_KEY_BYTES} bytes "
            f"(it holds {len(key)}); create it with `openssl rand -base64 32`"
        )
    if len(key) > MAX_KEY_BYTES:
        raise ConfigError(f"--cluster-key-file {path} holds more than {MAX_KEY_BYTES} bytes")
    return key


read_psk = read_cluster_key  # the older name


def trust_summary(cluster_key: bytes | None, cluster_key_file: str) -> dict[str, Any]:
    """What the agent trusts, as the start log, `doctor` and the debug page's feed report it."""
    if cluster_key is not None:
        return {"cluster_key": True, "tags_through_peers": True, "notice": None}
    where = f" (looked for {cluster_key_file})" if cluster_key_file else ""
    return {
        "cluster_key": False,
        "tags_through_peers": False,
        "notice": "no cluster key"
        + where
        + ": tags are never resolved through peers (they go upstream), digests still are "
        "(their bytes are verified); any pod can join the DHT. Create the Secret "
        "spegla-cluster-key and restart the agents.",
    }
