"""Command-line entry point: flags with env twins (Spegel's names and defaults) and subcommand
dispatch.

Why this shape: every flag is declared once in a table (`agent.cli.flags.FLAGS`) giving its env
twin, default and parser, so `--help`, env handling and error messages cannot drift apart. Values
are converted while parsing; a bad value (on the command line or in the environment) ends the
process with one `spegla: error:` line and exit code 2. `build_parser()` is public: the manifests'
tests parse the DaemonSet's args with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from agent import __version__
from agent.cli.flags import DESCRIPTIONS as _DESCRIPTIONS
from agent.cli.flags import FLAGS as _FLAGS
from agent.cli.flags import Flag
from agent.config import (
    BootstrapConfig,
    ConfigError,
    MirrorConfig,
    RegistryConfig,
    parse_port,
    parse_url,
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors, and env twins applied after the command line."""

    environ: Mapping[str, str] = os.environ

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        ns, extra = super().parse_known_args(args, namespace)
        command = getattr(ns, "command", None)
        if self.prog == "spegla" and command in _FLAGS:
            _apply_env_and_defaults(self, ns, _FLAGS[command], self.environ)
        return ns, extra


def _apply_env_and_defaults(
    parser: _Parser, ns: argparse.Namespace, flags: Sequence[Flag], environ: Mapping[str, str]
) -> None:
    for flag in flags:
        if getattr(ns, flag.dest, None) is not None:
            continue
        source = f"default of {flag.name}"
        raw: Any = flag.default
        if flag.env is not None and flag.env in environ:
            source, raw = f"{flag.env} (env)", environ[flag.env]
        try:
            if flag.many:
                items = raw.split(",") if isinstance(raw, str) else list(raw)
                value: Any = tuple(flag.parse(item.strip()) for item in items if item.strip())
            else:
                value = flag.parse(raw) if isinstance(raw, str) else raw
        except ConfigError as exc:
            parser.error(f"{source}: {exc}")
        setattr(ns, flag.dest, value)


def _converter(flag: Flag) -> Callable[[str], Any]:
    def convert(value: str) -> Any:
        try:
            return flag.parse(value)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = flag.dest
    return convert


def _add_flag(parser: argparse.ArgumentParser, flag: Flag) -> None:
    default = flag.default
    shown = ",".join(default) if isinstance(default, tuple) else default
    twin = f"env {flag.env}; " if flag.env else ""
    help_text = (
        f"{flag.help} ({twin}default {shown!r})"
        if shown != ""
        else f"{flag.help} ({twin}default empty)"
    )
    if flag.many:
        parser.add_argument(
            flag.name,
            dest=flag.dest,
            nargs="*",
            action="extend",
            type=_split_converter(flag),
            default=None,
            help=help_text,
            metavar=flag.metavar,
        )
    elif flag.boolean:
        parser.add_argument(
            flag.name,
            dest=flag.dest,
            nargs="?",
            const=True,
            type=_converter(flag),
            default=None,
            help=help_text,
            metavar="BOOL",
        )
    else:
        parser.add_argument(
            flag.name,
            dest=flag.dest,
            type=_converter(flag),
            default=None,
            help=help_text,
            metavar=flag.metavar,
        )


def _split_converter(flag: Flag) -> Callable[[str], Any]:
    """List flags take several values after the flag and/or comma-separated values."""

    def convert(value: str) -> Any:
        try:
            return [flag.parse(item.strip()) for item in value.split(",") if item.strip()]
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = flag.dest
    return convert


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The full `spegla` parser; env twins come from `environ` (default: the process env)."""
    parser = _Parser(
        prog="spegla",
        description="Node agent that makes every Kubernetes node a pull-only OCI registry mirror.",
        epilog="Every flag can also be set through the environment variable named in its help. "
        "Durations use Go syntax (20ms, 2s, 1m30s).",
    )
    parser.environ = os.environ if environ is None else environ
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )
    for command, flags in _FLAGS.items():
        cmd = sub.add_parser(
            command,
            help=_DESCRIPTIONS[command],
            description=_DESCRIPTIONS[command],
            allow_abbrev=False,  # like go-arg: `--data` is not `--data-dir`
        )
        for flag in flags:
            _add_flag(cmd, flag)
    sub.choices["doctor"].add_argument(
        "--json", action="store_true", help="print the checks as JSON (for machines)"
    )
    sub.choices["watch"].add_argument(
        "address",
        nargs="?",
        default="127.0.0.1:9090",
        metavar="ADDR",
        help="the agent's metrics address, host:port (default 127.0.0.1:9090)",
    )
    sub.choices["watch"].add_argument(
        "--plain",
        action="store_true",
        help="print plain lines even on a terminal (the default when stdout is not a terminal)",
    )
    version = sub.add_parser("version", help="print the version and exit")
    version.add_argument("--format", choices=["text", "json"], default="text")
    return parser


def _flatten(values: Any) -> tuple[Any, ...]:
    out: list[Any] = []
    for value in values:
        if isinstance(value, list):
            out.extend(value)
        else:
            out.append(value)
    return tuple(out)


def registry_config(ns: argparse.Namespace) -> RegistryConfig:
    """Build and cross-check the frozen config of `spegla registry` from parsed args."""
    bootstrap = BootstrapConfig(
        kind=ns.bootstrap_kind,
        dns_domain=ns.dns_bootstrap_domain,
        http_addr=ns.http_bootstrap_addr,
        http_url=ns.http_bootstrap_url,
        static_peers=_flatten(ns.static_bootstrap_peers),
        kubeconfig=ns.kubeconfig,
        lease_name=ns.leader_election_name,
        lease_namespace=ns.leader_election_namespace,
    )
    return RegistryConfig(
        registry_addr=ns.registry_addr,
        router_addr=ns.router_addr,
        metrics_addr=ns.metrics_addr,
        containerd_sock=ns.containerd_sock,
        containerd_namespace=ns.containerd_namespace,
        containerd_content_path=ns.containerd_content_path,
        mirrored_registries=_flatten(ns.mirrored_registries),
        registry_filters=_flatten(ns.registry_filters),
        mirror_resolve_timeout=ns.mirror_resolve_timeout,
        mirror_resolve_retries=ns.mirror_resolve_retries,
        mirror_buffer_memory=ns.mirror_buffer_memory << 20,
        mirror_peers_per_blob=ns.mirror_peers_per_blob,
        mirror_claim_wait=ns.mirror_claim_wait,
        mirror_request_deadline=ns.mirror_request_deadline,
        peer_upload_limit=ns.peer_upload_limit,
        max_connections=ns.max_connections,
        send_timeout=ns.send_timeout,
        trusted_proxies=ns.trusted_proxies,
        bootstrap=bootstrap,
        data_dir=ns.data_dir,
        debug_web_enabled=ns.debug_web_enabled,
        log_level=ns.log_level,
        advertise_addr=ns.advertise_addr,
        advertise_more_addrs=_flatten(ns.advertise_more_addrs),
        cluster_key_file=_cluster_key_file(ns.cluster_key_file, ns.dht_psk_file),
        standalone=ns.standalone,
        shutdown_grace=None if math.isinf(ns.shutdown_grace) else ns.shutdown_grace,
        state_refresh=ns.state_refresh,
        basic_auth_dir=ns.basic_auth_dir,
    ).validate()


def _cluster_key_file(cluster_key_file: str, dht_psk_file: str) -> str:
    """--cluster-key-file, or its older name --dht-psk-file; two different paths are an error."""
    if cluster_key_file and dht_psk_file and cluster_key_file != dht_psk_file:
        raise ConfigError(
            "--cluster-key-file and --dht-psk-file name different files (give one of them)"
        )
    return cluster_key_file or dht_psk_file


def mirror_config(ns: argparse.Namespace) -> MirrorConfig:
    targets = _flatten(ns.mirror_targets)
    if not targets:
        raise ConfigError("--mirror-targets is required (e.g. http://$(NODE_IP):30020)")
    return MirrorConfig(
        config_path=ns.containerd_registry_config_path,
        mirrored_registries=_flatten(ns.mirrored_registries),
        mirror_targets=targets,
        resolve_tags=ns.resolve_tags,
        prepend_existing=ns.prepend_existing,
        dial_timeout=ns.dial_timeout,
        basic_auth_dir=ns.basic_auth_dir,
    )


def doctor_config(ns: argparse.Namespace) -> Any:
    from agent.doctor.probes import DoctorConfig

    return DoctorConfig(
        containerd_sock=ns.containerd_sock,
        containerd_config=ns.containerd_config,
        config_path=ns.containerd_registry_config_path,
        content_path=ns.containerd_content_path,
        registry_addr=ns.registry_addr,
        router_addr=ns.router_addr,
        metrics_addr=ns.metrics_addr,
        mirrored_registries=_flatten(ns.mirrored_registries),
        mirror_targets=_flatten(ns.mirror_targets),
        standalone=ns.standalone,
        timeout=ns.probe_timeout,
        cluster_key_file=_cluster_key_file(ns.cluster_key_file, ns.dht_psk_file),
    )


def _keys_main(
    sock: str, namespace: str, mirrored: tuple[str, ...], filters: tuple[str, ...]
) -> int:
    import trio

    from agent.advertising.keys import collect_keys
    from agent.containerd.client import ContainerdError

    try:
        keys = trio.run(
            lambda: collect_keys(
                sock, namespace, mirrored_registries=list(mirrored), registry_filters=list(filters)
            )
        )
    except ContainerdError as exc:
        print(f"spegla keys: error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for key in keys:
        print(key)
    return 0


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    if args.command == "version":
        if args.format == "json":
            print(json.dumps({"version": __version__, "python": sys.version.split()[0]}))
        else:
            print(f"spegla {__version__}")
        return 0
    from agent.logs import configure_logging

    try:
        if args.command == "registry":
            cfg = registry_config(args)
            from agent.node.setup import read_basic_auth, read_cluster_key
            from agent.runtime.run import main as run_registry

            read_cluster_key(cfg.cluster_key_file)  # a bad key file is a bad flag value: fail now
            read_basic_auth(cfg.basic_auth_dir)  # so are unusable credential files
            configure_logging(cfg.log_level)

            return run_registry(cfg)
        configure_logging(args.log_level)
        if args.command == "configuration":
            from agent.node.hosts_toml import configure_main
            from agent.node.setup import read_cluster_key

            mirrors = mirror_config(args)
            key_file = _cluster_key_file(args.cluster_key_file, args.dht_psk_file)
            if mirrors.resolve_tags and read_cluster_key(key_file) is None:
                # without the cluster key the agents answer every tag with 404 (no peer can
                # prove what a tag means), so containerd is not told to ask them
                mirrors = dataclasses.replace(mirrors, resolve_tags=False)
            return configure_main(mirrors)
        if args.command == "cleanup":
            from agent.node.hosts_toml import cleanup_main

            return cleanup_main(args.containerd_registry_config_path, args.addr)
        if args.command == "cleanup-wait":
            from agent.node.hosts_toml import cleanup_wait_main

            if args.probe_endpoint is None:
                raise ConfigError("--probe-endpoint is required")
            if args.threshold < 1:
                raise ConfigError("--threshold must be at least 1")
            return cleanup_wait_main(args.probe_endpoint, args.threshold, args.period)
        if args.command == "watch":
            from agent.observability.watch import watch_main

            return watch_main(args.address, plain=True if args.plain else None)
        if args.command == "doctor":
            from agent.doctor.probes import doctor_main

            return doctor_main(doctor_config(args), as_json=args.json)
        if args.command == "keys":
            return _keys_main(
                args.containerd_sock,
                args.containerd_namespace,
                _flatten(args.mirrored_registries),
                _flatten(args.registry_filters),
            )
    except ConfigError as exc:
        parser.error(f"{args.command}: {exc}")
    return 2


__all__ = ["build_parser", "main", "mirror_config", "parse_port", "parse_url", "registry_config"]
