"""Flags, env twins, defaults and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli.main import _FLAGS, build_parser, main, registry_config
from agent.config import (
    ConfigError,
    HostPort,
    ListenAddr,
    format_duration,
    parse_duration,
    parse_listen_addr,
    parse_peer,
)
from agent.node.setup import more_addresses
from registry.mirror.job import MIRROR_DEFAULTS


def registry(argv: list[str], env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return registry_config(build_parser(env or {}).parse_args(["registry", *argv]))


def test_defaults_follow_spegel() -> None:
    cfg = registry([])
    assert cfg.registry_addr == ListenAddr("", 5000)
    assert cfg.router_addr == ListenAddr("", 5001)
    assert cfg.metrics_addr == ListenAddr("", 9090)
    assert cfg.containerd_sock == "/run/containerd/containerd.sock"
    assert cfg.containerd_namespace == "k8s.io"
    assert cfg.containerd_content_path == "/var/lib/containerd/io.containerd.content.v1.content"
    assert cfg.mirror_resolve_timeout == pytest.approx(0.020)
    assert cfg.mirror_resolve_retries == 3
    assert cfg.debug_web_enabled is True
    assert cfg.mirrored_registries == () and cfg.registry_filters == ()
    assert cfg.log_level == "INFO" and cfg.data_dir == ""


def test_mirror_settings_flow_from_the_flags_to_the_registry() -> None:
    # the defaults have one source (MirrorSettings); the flags override only what they name
    assert registry([]).mirror_settings() == MIRROR_DEFAULTS
    settings = registry(
        [
            *("--mirror-resolve-timeout", "35ms", "--mirror-resolve-retries", "5"),
            *("--mirror-buffer-memory", "96", "--mirror-peers-per-blob", "2"),
            *("--mirror-request-deadline", "2500ms"),
        ]
    ).mirror_settings()
    assert settings.resolve_timeout == pytest.approx(0.035) and settings.resolve_retries == 5
    assert settings.buffer_memory == 96 << 20 and settings.multi_peer_max == 2
    assert settings.request_deadline == pytest.approx(2.5)
    assert settings.response_timeout == MIRROR_DEFAULTS.response_timeout
    assert settings.stall_timeout == MIRROR_DEFAULTS.stall_timeout


def test_chart_style_args() -> None:
    cfg = registry(
        [
            "--log-level",
            "DEBUG",
            "--mirror-resolve-retries=3",
            "--mirror-resolve-timeout=20ms",
            "--registry-addr=:5000",
            "--router-addr=:5001",
            "--metrics-addr=:9090",
            "--mirrored-registries",
            "https://docker.io",
            "https://ghcr.io",
            "--containerd-sock=/run/containerd/containerd.sock",
            "--containerd-namespace=k8s.io",
            "--bootstrap-kind=dns",
            "--dns-bootstrap-domain=spegla-bootstrap.spegla.svc.cluster.local.",
            "--registry-filters",
            ":latest$",
            "--containerd-content-path=/var/lib/containerd/io.containerd.content.v1.content",
            "--debug-web-enabled=true",
            "--data-dir=/var/lib/spegla",
        ]
    )
    assert cfg.mirrored_registries == ("https://docker.io", "https://ghcr.io")
    assert cfg.registry_filters == (":latest$",)
    assert cfg.bootstrap.kind == "dns" and cfg.log_level == "DEBUG"


def test_env_twins_and_cli_precedence() -> None:
    env = {
        "REGISTRY_ADDR": "127.0.0.1:6000",
        "MIRROR_RESOLVE_TIMEOUT": "1.5s",
        "MIRRORED_REGISTRIES": "https://docker.io, https://quay.io",
        "STATIC_BOOTSTRAP_PEERS": "10.0.0.1:5001,[fd00::2]:5001",
        "BOOTSTRAP_KIND": "static",
        "DEBUG_WEB_ENABLED": "false",
        "LOG_LEVEL": "warn",
    }
    cfg = registry(["--registry-addr", "[::1]:7000"], env)
    assert cfg.registry_addr == ListenAddr("::1", 7000)  # the flag wins over the env
    assert cfg.mirror_resolve_timeout == 1.5
    assert cfg.mirrored_registries == ("https://docker.io", "https://quay.io")
    assert cfg.bootstrap.static_peers == (HostPort("10.0.0.1", 5001), HostPort("fd00::2", 5001))
    assert cfg.debug_web_enabled is False and cfg.log_level == "WARNING"


def test_more_advertised_addresses() -> None:
    env = {"ADVERTISE_MORE_ADDRS": "10.0.0.1, FD00:0::1"}  # e.g. status.podIPs
    cfg = registry(["--advertise-addr", "10.0.0.1"], env)
    assert cfg.advertise_more_addrs == ("10.0.0.1", "fd00::1")
    assert more_addresses(cfg, "10.0.0.1") == ("fd00::1",)  # the advertised one is left out
    assert more_addresses(registry([]), "10.0.0.1") == ()
    repeated = registry(["--advertise-more-addrs", "fd00::1", "--advertise-more-addrs", "fd00::2"])
    assert repeated.advertise_more_addrs == ("fd00::1", "fd00::2")
    for bad in ("node-a", "fe80::1%eth0"):
        with pytest.raises(SystemExit):
            registry(["--advertise-more-addrs", bad])
    with pytest.raises(ConfigError):
        registry(["--advertise-more-addrs", ",".join(f"10.0.0.{i}" for i in range(1, 7))])


def test_bool_flags() -> None:
    assert registry(["--debug-web-enabled=false"]).debug_web_enabled is False
    assert registry(["--standalone"]).standalone is True


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--registry-addr", "5000"], {}, "--registry-addr"),
        (["--metrics-addr", ":70000"], {}, "out of range"),
        (["--mirror-resolve-timeout", "20"], {}, "Go syntax"),
        ([], {"MIRROR_RESOLVE_TIMEOUT": "fast"}, "MIRROR_RESOLVE_TIMEOUT"),
        (["--bootstrap-kind", "mdns"], {}, "bootstrap kind"),
        (["--mirrored-registries", "docker.io"], {}, "http:// or https://"),
        (["--registry-filters", "("], {}, "regex"),
        (["--bootstrap-kind=dns"], {}, "--dns-bootstrap-domain"),
        (["--mirror-resolve-retries=0"], {}, "at least 1"),
        (["--mirror-buffer-memory=0"], {}, "at least 1"),
        (["--mirror-peers-per-blob=0"], {}, "at least 1"),
        (["--mirror-request-deadline=10ms"], {}, "between 100ms and 10m"),
        (["--registry-addr=:0"], {}, "fixed port"),
        (["--debug-web-enabled=maybe"], {}, "boolean"),
        (["--no-such-flag"], {}, "unrecognized"),
        (["--data", "/x"], {}, "unrecognized"),  # no abbreviations of --data-dir
    ],
)
def test_bad_values_exit_2_with_one_line(
    argv: list[str], env: dict[str, str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["registry", *argv], environ=env)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("spegla") and "error:" in err[0] and needle in err[0]


def test_help_lists_every_flag_and_env(capsys: pytest.CaptureFixture[str]) -> None:
    for command, flags in _FLAGS.items():
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"], environ={})
        assert exc.value.code == 0
        out = capsys.readouterr().out.replace("\n", " ")
        for flag in flags:
            assert flag.name in out
            if flag.env:
                assert flag.env in out.replace(" ", "") or flag.env in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version", "--format", "json"], environ={}) == 0
    assert json.loads(capsys.readouterr().out)["version"]


def test_console_entry_point_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agent", "version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert out.stdout.startswith("spegla ")
    bad = subprocess.run(
        [sys.executable, "-m", "agent", "registry", "--router-addr", "x:y"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_value_parsers() -> None:
    assert parse_duration("1m30s") == 90 and parse_duration("500us") == pytest.approx(0.0005)
    assert format_duration(0.2) == "200ms" and format_duration(540) == "9m"
    assert parse_listen_addr(":9090") == ListenAddr("", 9090)
    assert parse_peer("10.0.0.1", default_port=5001) == HostPort("10.0.0.1", 5001)
    for bad in ("", "1x", "-5s", "ms"):
        with pytest.raises(ConfigError):
            parse_duration(bad)
    for bad in ("[::1]5000", "a:b:c", "host:", "bad_host!:1"):
        with pytest.raises(ConfigError):
            parse_listen_addr(bad)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "/ip4/10.0.0.1/tcp/5001/p2p/12D3KooWJbBoPbPvCp3Tg2zYXLx7Ti9b3KZz6Yd5hfPkcWoj2EYY",
            HostPort("10.0.0.1", 5001),
        ),
        ("/ip4/10.0.0.1/tcp/5001", HostPort("10.0.0.1", 5001)),
        ("/ip6/fd00::2/tcp/5001/p2p/QmPeer", HostPort("fd00::2", 5001)),
        ("/ip4/10.0.0.3/udp/5001/quic-v1/p2p/QmPeer", HostPort("10.0.0.3", 5001)),
        ("/dns/spegel-node-a.example/tcp/5001/p2p/QmPeer", HostPort("spegel-node-a.example", 5001)),
        ("/dns4/node-b/tcp/6001", HostPort("node-b", 6001)),
        ("10.0.0.4:5001", HostPort("10.0.0.4", 5001)),
        ("[fd00::5]:5001", HostPort("fd00::5", 5001)),
    ],
)
def test_static_bootstrap_peers_accept_spegel_multiaddrs(value: str, expected: HostPort) -> None:
    assert registry(
        ["--bootstrap-kind=static", "--static-bootstrap-peers", value]
    ).bootstrap.static_peers == (expected,)
    env = {"BOOTSTRAP_KIND": "static", "STATIC_BOOTSTRAP_PEERS": f"{value}, 10.9.9.9:5001"}
    assert registry([], env).bootstrap.static_peers == (expected, HostPort("10.9.9.9", 5001))


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("/ip4/10.0.0.1", "invalid multiaddr"),
        ("/ip4/300.0.0.1/tcp/5001", "invalid IP"),
        ("/ip4/fd00::1/tcp/5001", "v6 address"),
        ("/ip6/10.0.0.1/tcp/5001", "v4 address"),
        ("/ip4/10.0.0.1/tcp/http", "invalid port"),
        ("/ip4/10.0.0.1/tcp/0", "port 0"),
        ("/ip4/10.0.0.1/sctp/5001", "no /tcp"),
        ("/unix/tmp/sock/x", "unsupported multiaddr"),
        ("/dnsaddr/bootstrap.example/tcp/5001", "unsupported multiaddr"),
        ("/ip4/10.0.0.1/tcp/5001/p2p", "unsupported part"),
        ("/ip4/10.0.0.1/tcp/5001/ws", "unsupported part"),
        ("/dns/bad_host!/tcp/5001", "invalid host"),
    ],
)
def test_bad_multiaddrs_are_one_line_errors(
    value: str, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        registry(["--bootstrap-kind=static", "--static-bootstrap-peers", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_registry_refuses_unusable_basic_auth_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "password").write_bytes(b"one\ntwo\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["registry", "--basic-auth-dir", str(tmp_path)], environ={})
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--basic-auth-dir" in err and "more than one line" in err
    assert len(err.splitlines()) == 1
    assert registry([]).basic_auth_dir == "/etc/secrets/basic-auth"  # Spegel's path
    assert registry([], {"BASIC_AUTH_DIR": "/run/auth"}).basic_auth_dir == "/run/auth"


def test_shutdown_grace_waits_for_running_requests_by_default() -> None:
    assert registry([]).shutdown_grace is None  # like Spegel: the pod's grace period bounds it
    assert registry(["--shutdown-grace=45s"]).shutdown_grace == 45.0
    assert registry([], {"SHUTDOWN_GRACE": "2m"}).shutdown_grace == 120.0
    assert registry(["--shutdown-grace", "none"], {"SHUTDOWN_GRACE": "1s"}).shutdown_grace is None
