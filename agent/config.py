"""Typed, validated agent configuration: value parsers (Go durations, listen addresses, peers) and
frozen records built from flags <- env <- defaults.

Why a module of its own: the CLI, the manifests' tests and the wiring all need the same meaning for
`--registry-addr :5000` or `MIRROR_RESOLVE_TIMEOUT=20ms`; parsing lives here as pure functions that
raise `ConfigError` with a message fit for one line on stderr.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from registry.mirror.job import MIRROR_DEFAULTS, MirrorSettings


class ConfigError(ValueError):
    """A flag or env value is malformed; the message names what is wrong, in one line."""


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration(text: str) -> float:
    """Parse a Go duration (`20ms`, `2s`, `1m30s`, `0`) into seconds (never negative)."""
    raw = text.strip()
    if raw == "0":
        return 0.0
    if not raw:
        raise ConfigError("empty duration")
    pos = 0
    total = 0.0
    while pos < len(raw):
        match = _DURATION_PART.match(raw, pos)
        if match is None:
            raise ConfigError(f"invalid duration {text!r} (use Go syntax such as 20ms, 2s, 1m30s)")
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    return total


def format_duration(seconds: float) -> str:
    """Render seconds in the shortest Go-like form used in help texts (`20ms`, `2s`, `10m`)."""
    if seconds == 0:
        return "0s"
    for unit, factor in (("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        value = seconds / factor
        if value >= 1 and abs(value - round(value)) < 1e-9:
            return f"{round(value)}{unit}"
    return f"{seconds}s"


UNBOUNDED = ("none", "unlimited", "")


def parse_grace(text: str) -> float:
    """A shutdown grace: a Go duration, or `none` for "wait for every running request" (inf)."""
    if text.strip().lower() in UNBOUNDED:
        return math.inf
    return parse_duration(text)


def grace_seconds(grace: float | None) -> float:
    """The grace as a deadline offset (an unbounded grace is infinite)."""
    return math.inf if grace is None else grace


def parse_bool(text: str | bool) -> bool:
    """Accept the spellings Go's strconv.ParseBool does (true/false, 1/0, t/f), any case."""
    if isinstance(text, bool):
        return text
    value = text.strip().lower()
    if value in ("1", "t", "true", "yes", "on"):
        return True
    if value in ("0", "f", "false", "no", "off"):
        return False
    raise ConfigError(f"invalid boolean {text!r} (use true or false)")


def parse_ip(text: str) -> str:
    """An IP address literal (v4 or v6, no brackets, no zone), in its one canonical spelling."""
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        raise ConfigError(f"{text!r} is not an IP address") from None
    if "%" in text:
        raise ConfigError(f"{text!r}: an address with a zone cannot be advertised to peers")
    return str(ip)


def parse_port(text: str) -> int:
    if not text.isdigit():
        raise ConfigError(f"invalid port {text!r}")
    port = int(text)
    if port > 65535:
        raise ConfigError(f"port {port} out of range 0-65535")
    return port


@dataclass(frozen=True, slots=True)
class ListenAddr:
    """Where to bind: an empty host means every interface (Go's `:5000`)."""

    host: str
    port: int

    @property
    def bind_host(self) -> str:
        return self.host or "0.0.0.0"

    def __str__(self) -> str:
        return f"{_bracket(self.host)}:{self.port}"


@dataclass(frozen=True, slots=True)
class HostPort:
    """A peer endpoint: an IP literal or DNS name and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{_bracket(self.host)}:{self.port}"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _split_host_port(text: str) -> tuple[str, str]:
    raw = text.strip()
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0 or raw[end + 1 : end + 2] != ":":
            raise ConfigError(f"invalid address {text!r} (expected [v6]:port)")
        return raw[1:end], raw[end + 2 :]
    if raw.count(":") != 1:
        raise ConfigError(f"invalid address {text!r} (expected host:port, [v6]:port or :port)")
    host, _, port = raw.partition(":")
    return host, port


def _check_host(host: str, text: str) -> None:
    if not host:
        return
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if not all(
        re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", label) for label in labels
    ):
        raise ConfigError(f"invalid host in {text!r}")


def parse_listen_addr(text: str) -> ListenAddr:
    """`:5000`, `0.0.0.0:5000`, `127.0.0.1:0`, `[::]:5001`, `localhost:9090`."""
    host, port = _split_host_port(text)
    _check_host(host, text)
    return ListenAddr(host, parse_port(port))


def parse_peer(text: str, default_port: int | None = None) -> HostPort:
    """`10.0.0.1:5001`, `[fd00::1]:5001`, `node-a:5001`; a bare IP takes `default_port`."""
    raw = text.strip()
    if default_port is not None:
        try:
            ipaddress.ip_address(raw.strip("[]"))
        except ValueError:
            pass
        else:
            return HostPort(raw.strip("[]"), default_port)
    host, port = _split_host_port(raw)
    if not host:
        raise ConfigError(f"peer {text!r} has no host")
    _check_host(host, text)
    return HostPort(host, parse_port(port))


_MULTIADDR_IP = {"ip4": 4, "ip6": 6}
_MULTIADDR_DNS = ("dns", "dns4", "dns6")  # not /dnsaddr: that names TXT records
_MULTIADDR_PORT = ("tcp", "udp")
# protocols after the transport that carry no address information for us
_MULTIADDR_SKIP = {"p2p": 1, "ipfs": 1, "quic": 0, "quic-v1": 0, "webtransport": 0, "certhash": 1}


def parse_multiaddr(text: str) -> HostPort:
    """A Spegel/libp2p multiaddr: `/ip4/10.0.0.1/tcp/5001/p2p/<id>`,
    `/ip6/fd00::1/udp/5001/quic-v1`, `/dns/node-a/tcp/5001`.  The libp2p peer id is dropped:
    spegla's node ids are its own, so a peer is known by its address and DHT port (the same
    port number Spegel uses for tcp/quic)."""
    raw = text.strip()
    parts = raw.split("/")
    if parts[0] != "" or len(parts) < 5:
        raise ConfigError(f"invalid multiaddr {text!r} (expected /ip4/<ip>/tcp/<port>[/p2p/<id>])")
    kind, host, transport, port_text, rest = parts[1], parts[2], parts[3], parts[4], parts[5:]
    if kind in _MULTIADDR_IP:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"invalid IP {host!r} in multiaddr {text!r}") from None
        if address.version != _MULTIADDR_IP[kind]:
            raise ConfigError(f"/{kind} with a v{address.version} address in {text!r}")
    elif kind in _MULTIADDR_DNS:
        _check_host(host, text)
        if not host:
            raise ConfigError(f"multiaddr {text!r} has no host")
    else:
        raise ConfigError(f"unsupported multiaddr {text!r} (use /ip4, /ip6 or /dns)")
    if transport not in _MULTIADDR_PORT:
        raise ConfigError(f"multiaddr {text!r} has no /tcp/<port> or /udp/<port>")
    port = parse_port(port_text)
    while rest:
        name = rest[0]
        if name not in _MULTIADDR_SKIP or len(rest) < 1 + _MULTIADDR_SKIP[name]:
            raise ConfigError(f"unsupported part /{name} in multiaddr {text!r}")
        if any(not value for value in rest[1 : 1 + _MULTIADDR_SKIP[name]]):
            raise ConfigError(f"empty /{name} value in multiaddr {text!r}")
        rest = rest[1 + _MULTIADDR_SKIP[name] :]
    if port == 0:
        raise ConfigError(f"multiaddr {text!r} has port 0")
    return HostPort(host, port)


def parse_static_peer(text: str) -> HostPort:
    """A static bootstrap peer: `host:port` / `[v6]:port`, or Spegel's multiaddr form."""
    if text.strip().startswith("/"):
        return parse_multiaddr(text)
    return parse_peer(text)


def parse_url(text: str, *, what: str, allow_path: bool = False) -> str:
    """An http(s) URL with a host; no userinfo, query or fragment (no path unless `allow_path`)."""
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{what} {text!r} must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.query or parts.fragment:
        raise ConfigError(f"{what} {text!r} must not carry userinfo, a query or a fragment")
    if not allow_path and parts.path not in ("", "/"):
        raise ConfigError(f"{what} {text!r} must not have a path")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ConfigError(f"{what} {text!r} has an invalid port") from exc
    return text.strip().rstrip("/") if not allow_path else text.strip()


def parse_mirrored_registry(text: str) -> str:
    """A registry URL such as `https://docker.io`, or `_default` / `*` for all registries."""
    value = text.strip()
    if value in ("_default", "*"):
        return value
    return parse_url(value, what="mirrored registry")


def parse_regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise ConfigError(f"invalid registry filter regex {text!r}: {exc}") from exc
    return text


LOG_LEVELS = ("DEBUG", "INFO", "WARN", "WARNING", "ERROR")


def parse_log_level(text: str) -> str:
    value = text.strip().upper()
    if value not in LOG_LEVELS:
        raise ConfigError(f"invalid log level {text!r} (use DEBUG, INFO, WARN or ERROR)")
    return "WARNING" if value == "WARN" else value


BOOTSTRAP_KINDS = ("dns", "http", "static", "kubernetes", "none")


@dataclass(frozen=True, slots=True)
class BootstrapConfig:
    """How this node finds its first DHT peers."""

    kind: str = "none"
    dns_domain: str = ""
    http_addr: ListenAddr | None = None
    http_url: str = ""
    static_peers: tuple[HostPort, ...] = ()
    kubeconfig: str = ""
    lease_name: str = "spegla-leader-election"
    lease_namespace: str = "spegla"


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    """Everything `spegla registry` needs, validated."""

    registry_addr: ListenAddr = ListenAddr("", 5000)
    router_addr: ListenAddr = ListenAddr("", 5001)
    metrics_addr: ListenAddr = ListenAddr("", 9090)
    containerd_sock: str = "/run/containerd/containerd.sock"
    containerd_namespace: str = "k8s.io"
    containerd_content_path: str = "/var/lib/containerd/io.containerd.content.v1.content"
    mirrored_registries: tuple[str, ...] = ()
    registry_filters: tuple[str, ...] = ()
    mirror_resolve_timeout: float = MIRROR_DEFAULTS.resolve_timeout
    mirror_resolve_retries: int = MIRROR_DEFAULTS.resolve_retries
    mirror_buffer_memory: int = MIRROR_DEFAULTS.buffer_memory  # bytes
    mirror_peers_per_blob: int = MIRROR_DEFAULTS.multi_peer_max
    mirror_claim_wait: float = MIRROR_DEFAULTS.claim_wait
    mirror_request_deadline: float = MIRROR_DEFAULTS.request_deadline
    peer_upload_limit: int = 8
    max_connections: int = 1024  # registry connections at once (0: no cap)
    send_timeout: float = 30.0  # a client that takes no response bytes this long is cut
    # --trusted-proxies: X-Forwarded-For is believed only from these networks
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    bootstrap: BootstrapConfig = BootstrapConfig()
    data_dir: str = ""
    debug_web_enabled: bool = True
    log_level: str = "INFO"
    advertise_addr: str = ""
    advertise_more_addrs: tuple[str, ...] = ()  # other IPs peers may dial (dht.addresses)
    # the cluster key (--cluster-key-file, alias --dht-psk-file): DHT datagram MACs, peer
    # credentials and tag answer proofs (registry.auth.peer); empty: no key
    cluster_key_file: str = ""
    standalone: bool = False
    # on SIGTERM: how long running requests may still finish; None waits for every one of them
    # (like Spegel: the pod's terminationGracePeriodSeconds is the bound)
    shutdown_grace: float | None = None
    state_refresh: float = 540.0
    basic_auth_dir: str = "/etc/secrets/basic-auth"

    def validate(self) -> RegistryConfig:
        """Cross-field checks (each flag alone was already parsed)."""
        kind = self.bootstrap.kind
        if kind == "dns" and not self.bootstrap.dns_domain:
            raise ConfigError("--bootstrap-kind=dns needs --dns-bootstrap-domain")
        if kind == "static" and not self.bootstrap.static_peers:
            raise ConfigError("--bootstrap-kind=static needs --static-bootstrap-peers")
        if kind == "http" and not (self.bootstrap.http_url or self.bootstrap.http_addr):
            raise ConfigError(
                "--bootstrap-kind=http needs --http-bootstrap-url and/or --http-bootstrap-addr"
            )
        if self.registry_addr.port == 0:
            raise ConfigError("--registry-addr needs a fixed port: peers fetch from that port")
        if self.mirror_resolve_retries < 1:
            raise ConfigError("--mirror-resolve-retries must be at least 1")
        if self.mirror_resolve_timeout <= 0:
            raise ConfigError("--mirror-resolve-timeout must be greater than 0")
        if not MIRROR_DEFAULTS.claim_settle <= self.mirror_claim_wait <= 600:
            raise ConfigError("--mirror-claim-wait must be between 20ms and 10m")
        if not 0.1 <= self.mirror_request_deadline <= 600:
            raise ConfigError("--mirror-request-deadline must be between 100ms and 10m")
        if self.peer_upload_limit < 0:
            raise ConfigError("--peer-upload-limit must be 0 (no limit) or more")
        if self.max_connections < 0:
            raise ConfigError("--max-connections must be 0 (no cap) or more")
        if self.send_timeout <= 0:
            raise ConfigError("--send-timeout must be greater than 0")
        if self.mirror_buffer_memory < MIRROR_DEFAULTS.buffer_size:
            raise ConfigError("--mirror-buffer-memory must be at least 1 (MiB)")
        if self.mirror_peers_per_blob < 1:
            raise ConfigError("--mirror-peers-per-blob must be at least 1")
        if len(set(self.advertise_more_addrs) - {self.advertise_addr}) > 4:
            raise ConfigError("--advertise-more-addrs takes at most 4 addresses")
        return self

    def mirror_settings(self) -> MirrorSettings:
        """The registry's mirror settings: the defaults, with what the flags set."""
        return replace(
            MIRROR_DEFAULTS,
            resolve_timeout=self.mirror_resolve_timeout,
            resolve_retries=self.mirror_resolve_retries,
            buffer_memory=self.mirror_buffer_memory,
            multi_peer_max=self.mirror_peers_per_blob,
            claim_wait=self.mirror_claim_wait,
            request_deadline=self.mirror_request_deadline,
        )


@dataclass(frozen=True, slots=True)
class MirrorConfig:
    """What `spegla configuration` writes into containerd's registry config path."""

    config_path: str = "/etc/containerd/certs.d"
    mirrored_registries: tuple[str, ...] = ()
    mirror_targets: tuple[str, ...] = ()
    resolve_tags: bool = True
    prepend_existing: bool = False
    dial_timeout: float = 0.2
    basic_auth_dir: str = "/etc/secrets/basic-auth"
