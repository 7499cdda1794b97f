"""Every flag of every `spegla` subcommand, declared once: name, env twin, default, value parser.

Why a table of its own: `--help`, env handling and error messages are all built from it
(`agent.cli.main`), so they cannot drift apart; the mirror defaults come from `MirrorSettings`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.config import (
    BOOTSTRAP_KINDS,
    ConfigError,
    format_duration,
    parse_bool,
    parse_duration,
    parse_grace,
    parse_ip,
    parse_listen_addr,
    parse_log_level,
    parse_mirrored_registry,
    parse_peer,
    parse_regex,
    parse_static_peer,
    parse_url,
)
from registry.auth.basic import DEFAULT_DIR as DEFAULT_BASIC_AUTH_DIR
from registry.http.connection import DEFAULT_SEND_TIMEOUT
from registry.http.server import DEFAULT_MAX_CONNECTIONS
from registry.mirror.job import MIRROR_DEFAULTS
from registry.serve.access_log import TrustedProxies, parse_trusted_proxies


@dataclass(frozen=True, slots=True)
class Flag:
    """One command-line flag and its environment twin."""

    name: str
    default: Any
    parse: Callable[[str], Any]
    help: str
    many: bool = False
    boolean: bool = False
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")

    @property
    def env(self) -> str:
        """The env twin, named as go-arg names it: `--registry-addr` -> `REGISTRY_ADDR`."""
        return self.dest.upper()


def _text(value: str) -> str:
    return value


def _trusted_proxies(value: str) -> TrustedProxies:
    try:
        return parse_trusted_proxies(value)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"invalid integer {value!r}") from None


def _kind(value: str) -> str:
    if value not in BOOTSTRAP_KINDS:
        raise ConfigError(f"invalid bootstrap kind {value!r} (one of {', '.join(BOOTSTRAP_KINDS)})")
    return value


def _mirror_target(value: str) -> str:
    from agent.node.hosts_toml import encapsulate_ipv6

    return parse_url(encapsulate_ipv6(value.strip()), what="mirror target")


def _http_url(value: str) -> str:
    return parse_url(value, what="URL", allow_path=True) if value else ""


def _probe_endpoint(value: str) -> Any:
    return parse_peer(value) if value else None


def _optional_listen(value: str) -> Any:
    return parse_listen_addr(value) if value else None


# fmt: off
_LOG_LEVEL = Flag("--log-level", "INFO", parse_log_level,
     "minimum log level: DEBUG, INFO, WARN, ERROR")
_SOCK = Flag("--containerd-sock", "/run/containerd/containerd.sock", _text,
     "containerd gRPC socket", metavar="PATH")
_NAMESPACE = Flag("--containerd-namespace", "k8s.io", _text,
     "containerd namespace", metavar="NS")
_MIRRORED = Flag("--mirrored-registries", (), parse_mirrored_registry,
     "registry URLs to mirror (e.g. https://docker.io); empty, _default or * means all",
     many=True, metavar="URL")
_FILTERS = Flag("--registry-filters", (), parse_regex,
     "regexes over registry/repository[:tag]; a match is not served nor advertised (':latest$')",
     many=True, metavar="REGEX")
_BASIC_AUTH_DIR = Flag("--basic-auth-dir", DEFAULT_BASIC_AUTH_DIR, _text,
     "directory with `username` and/or `password` files (a mounted Secret): if either exists, "
     "registry requests need these Basic credentials, and peers and containerd send them",
     metavar="DIR")
_CONFIG_PATH = Flag("--containerd-registry-config-path", "/etc/containerd/certs.d", _text,
     "containerd registry config_path (certs.d) directory", metavar="DIR")
_REGISTRY_ADDR = Flag("--registry-addr", ":5000", parse_listen_addr,
     "registry HTTP listen address; its port is every peer's registry port", metavar="ADDR")
_ROUTER_ADDR = Flag("--router-addr", ":5001", parse_listen_addr,
     "DHT (UDP) listen address", metavar="ADDR")
_METRICS_ADDR = Flag("--metrics-addr", ":9090", parse_listen_addr,
     "serves /metrics, /debug/tasks and /debug/web", metavar="ADDR")
_CONTENT_PATH = Flag("--containerd-content-path",
     "/var/lib/containerd/io.containerd.content.v1.content", _text,
     "containerd content directory read directly; empty means stream blobs over gRPC",
     metavar="DIR")
_STANDALONE = Flag("--standalone", "false", parse_bool,
     "ready without any peer (a single-node cluster)", boolean=True)
_MIRROR_TARGETS = Flag("--mirror-targets", (), _mirror_target,
     "mirror URLs containerd tries first, in order (required)", many=True, metavar="URL")

FLAGS: dict[str, tuple[Flag, ...]] = {
    "registry": (
        _LOG_LEVEL,
        _REGISTRY_ADDR,
        _ROUTER_ADDR,
        _METRICS_ADDR,
        _SOCK,
        _NAMESPACE,
        _CONTENT_PATH,
        _MIRRORED,
        _FILTERS,
        Flag("--mirror-resolve-timeout", format_duration(MIRROR_DEFAULTS.resolve_timeout),
             parse_duration,
             "how long to wait for a peer before each retry (Go duration)", metavar="DURATION"),
        Flag("--mirror-resolve-retries", str(MIRROR_DEFAULTS.resolve_retries), _int,
             "peer look-up attempts per request", metavar="N"),
        Flag("--mirror-buffer-memory", str(MIRROR_DEFAULTS.buffer_memory >> 20), _int,
             "MiB of memory for blob bytes in transit from peers, over all requests (keep it "
             "well under the DaemonSet's memory limit; an idle agent holds ~50 MiB)",
             metavar="MIB"),
        Flag("--mirror-peers-per-blob", str(MIRROR_DEFAULTS.multi_peer_max), _int,
             "providers a big blob (32 MiB or more) is fetched from at once, as byte ranges "
             "(1: one peer per blob)", metavar="N"),
        Flag("--mirror-claim-wait", format_duration(MIRROR_DEFAULTS.claim_wait), parse_duration,
             "in a burst (nodes missing one layer at once), how long a node waits for the one "
             "that fetches it upstream to start receiving it before going upstream itself "
             "(Go duration)", metavar="DURATION"),
        Flag("--mirror-request-deadline", format_duration(MIRROR_DEFAULTS.request_deadline),
             parse_duration,
             "a blob GET this node cannot serve from its own store finds a peer that answers, "
             "or answers 404 (containerd then goes upstream), within this; claim waits and busy "
             "peers count against it (Go duration)", metavar="DURATION"),
        Flag("--peer-upload-limit", "8", _int,
             "blob downloads this node serves to peers at once; more get 429 and ask another "
             "peer, so a burst spreads as a tree (0: no limit)", metavar="N"),
        Flag("--max-connections", str(DEFAULT_MAX_CONNECTIONS), _int,
             "registry connections open at once; one more gets 503 with Retry-After and is "
             "closed (containerd then tries its next host) (0: no cap)", metavar="N"),
        Flag("--send-timeout", format_duration(DEFAULT_SEND_TIMEOUT), parse_duration,
             "a registry client that takes no response bytes for this long is cut off, its "
             "upload slot and file freed (Go duration)", metavar="DURATION"),
        Flag("--trusted-proxies", "", _trusted_proxies,
             "comma-separated CIDRs of proxies whose X-Forwarded-For is believed (for the "
             "logged client and \"is this my own containerd\"); empty: the header is ignored",
             metavar="CIDRS"),
        Flag("--bootstrap-kind", "none", _kind,
             "how to find the first peers: dns, http, static, kubernetes, none", metavar="KIND"),
        Flag("--dns-bootstrap-domain", "", _text,
             "dns: headless Service name; first 3 A and 3 AAAA records (sorted) are the seeds",
             metavar="DOMAIN"),
        Flag("--http-bootstrap-addr", "", _optional_listen,
             "http: address to serve GET /id on (empty: don't serve)", metavar="ADDR"),
        Flag("--http-bootstrap-url", "", _http_url,
             "http: URL answering like /id, fetched for the seed peers", metavar="URL"),
        Flag("--static-bootstrap-peers", (), parse_static_peer,
             "static: seed peers as host:port (the DHT port) or Spegel multiaddrs "
             "(/ip4/10.0.0.1/tcp/5001/p2p/<id>; the peer id is ignored)",
             many=True, metavar="PEER"),
        Flag("--kubeconfig", "", _text,
             "kubernetes: kubeconfig file (empty: in-cluster service account)", metavar="PATH"),
        Flag("--leader-election-name", "spegla-leader-election", _text,
             "kubernetes: Lease name", metavar="NAME"),
        Flag("--leader-election-namespace", "spegla", _text,
             "kubernetes: Lease namespace", metavar="NS"),
        Flag("--data-dir", "", _text,
             "directory keeping the node id across restarts (empty: new id per start)",
             metavar="DIR"),
        Flag("--debug-web-enabled", "true", parse_bool,
             "serve /debug/web on the metrics address", boolean=True),
        Flag("--advertise-addr", "", _text,
             "IP peers reach this node on (default: detected; set it to the pod IP)", metavar="IP"),
        Flag("--advertise-more-addrs", (), parse_ip,
             "more IPs this node's registry answers on, beside the one its DHT datagrams come "
             "from (dual-stack: the pod's IPs, e.g. status.podIPs; repeating that one is "
             "harmless); peers race connects to all of them (at most 4)",
             many=True, metavar="IP"),
        Flag("--cluster-key-file", "", _text,
             "file holding the cluster key (at least 16 bytes): only agents with the same key "
             "join the DHT, resolve tags for each other and get each other's content without "
             "the Basic password; a missing file in an existing directory (the optional "
             "Secret not created) means no key: tags are then never resolved through peers",
             metavar="PATH"),
        Flag("--dht-psk-file", "", _text,
             "older name of --cluster-key-file (either may be given, not two different paths)",
             metavar="PATH"),
        _STANDALONE,
        Flag("--shutdown-grace", "none", parse_grace,
             "on SIGTERM, how long running requests (transfers) may still finish; `none` waits "
             "for all of them, bounded by the pod's terminationGracePeriodSeconds as in Spegel",
             metavar="DURATION"),
        Flag("--state-refresh", "9m", parse_duration,
             "full re-scan and re-advertise of containerd content", metavar="DURATION"),
        _BASIC_AUTH_DIR,
    ),
    "configuration": (
        _LOG_LEVEL,
        _CONFIG_PATH,
        _MIRRORED,
        _MIRROR_TARGETS,
        Flag("--resolve-tags", "true", parse_bool,
             "let mirrors resolve tags (capabilities pull+resolve, else pull)", boolean=True),
        Flag("--cluster-key-file", "", _text,
             "the agents' cluster key file: without a key mirrors never resolve tags, whatever "
             "--resolve-tags says (the agents would refuse them)", metavar="PATH"),
        Flag("--dht-psk-file", "", _text,
             "older name of --cluster-key-file", metavar="PATH"),
        Flag("--prepend-existing", "false", parse_bool,
             "keep the mirrors that were configured before, after ours", boolean=True),
        Flag("--dial-timeout", "200ms", parse_duration,
             "dial_timeout written for each mirror (containerd >= 2.1 honours it)",
             metavar="DURATION"),
        _BASIC_AUTH_DIR,
    ),
    "cleanup": (
        _LOG_LEVEL,
        _CONFIG_PATH,
        Flag("--addr", "", _optional_listen,
             "after restoring, answer 200 on this address until terminated", metavar="ADDR"),
    ),
    "cleanup-wait": (
        _LOG_LEVEL,
        Flag("--probe-endpoint", "", _probe_endpoint,
             "host:port of the cleanup pods' headless Service (required)", metavar="HOST:PORT"),
        Flag("--threshold", "3", _int,
             "consecutive all-ready rounds needed", metavar="N"),
        Flag("--period", "2s", parse_duration,
             "time between rounds", metavar="DURATION"),
    ),
    "watch": (
        _LOG_LEVEL,
    ),
    "doctor": (
        _LOG_LEVEL,
        _SOCK,
        Flag("--containerd-config", "/etc/containerd/config.toml", _text,
             "containerd's config file (read for containerd 2.x only)", metavar="PATH"),
        _CONFIG_PATH,
        _CONTENT_PATH,
        _REGISTRY_ADDR,
        _ROUTER_ADDR,
        _METRICS_ADDR,
        _MIRRORED,
        Flag("--mirror-targets", (), _mirror_target,
             "the mirror URLs the `configuration` step wrote (default: any address of this "
             "machine on the registry port)", many=True, metavar="URL"),
        _STANDALONE,
        Flag("--probe-timeout", "2s", parse_duration,
             "time budget of each probe", metavar="DURATION"),
        Flag("--cluster-key-file", "", _text,
             "the agent's cluster key file (checked: present and usable)", metavar="PATH"),
        Flag("--dht-psk-file", "", _text,
             "older name of --cluster-key-file", metavar="PATH"),
    ),
    "keys": (
        _LOG_LEVEL,
        _SOCK,
        _NAMESPACE,
        _MIRRORED,
        _FILTERS,
    ),
}
# fmt: on

DESCRIPTIONS = {
    "registry": "run the node agent: DHT, containerd state tracker, mirror, metrics and debug",
    "configuration": "write containerd hosts.toml files pointing mirrored registries at the agent",
    "cleanup": "restore the containerd registry config that was there before `configuration`",
    "cleanup-wait": "wait until every cleanup pod answers /readyz (uninstall hook)",
    "keys": "print the keys this node would advertise (one per line)",
    "doctor": "check this node's containerd and agent for what silently disables the mirror",
    "watch": "live view of one agent (peers, images, mirror requests, transfers, rates)",
}
