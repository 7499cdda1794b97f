"""Golden-file tests of the containerd hosts.toml writer, backup, prepend and cleanup."""

from __future__ import annotations

import functools
import os
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.cli.main import main
from agent.config import ConfigError, MirrorConfig
from agent.node.hosts_toml import cleanup, configure, encapsulate_ipv6, render_hosts_toml

GOLDEN = Path(__file__).parent / "golden"


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def snapshot(root: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "<dir>" if path.is_dir() else path.read_text()
    return out


def test_default_registry_two_targets() -> None:
    text = render_hosts_toml(
        "_default", ["http://10.0.0.5:30020", "http://10.0.0.5:30021"], dial_timeout=0.2
    )
    golden("default_two_targets.toml", text)
    data = tomllib.loads(text)
    assert "server" not in data
    assert list(data["host"]) == ["http://10.0.0.5:30020", "http://10.0.0.5:30021"]


def test_docker_hub_is_rewritten_and_pull_only() -> None:
    text = render_hosts_toml("https://docker.io", ["http://10.0.0.5:30020"], resolve_tags=False)
    golden("docker_io_pull_only.toml", text)
    data = tomllib.loads(text)
    assert data["server"] == "https://registry-1.docker.io"
    assert data["host"]["http://10.0.0.5:30020"]["capabilities"] == ["pull"]


def test_plain_http_registry_and_ipv6_target() -> None:
    text = render_hosts_toml("http://10.213.0.2:5000", ["http://fd00::5:30020"])
    golden("http_registry_ipv6.toml", text)
    assert '[host."http://[fd00::5]:30020"]' in text


def test_encapsulate_ipv6() -> None:
    assert encapsulate_ipv6("http://fd00::1:30020") == "http://[fd00::1]:30020"
    assert encapsulate_ipv6("http://[fd00::1]:30020") == "http://[fd00::1]:30020"
    assert encapsulate_ipv6("http://10.0.0.1:30020") == "http://10.0.0.1:30020"


def test_no_targets_is_an_error() -> None:
    with pytest.raises(ConfigError):
        render_hosts_toml("_default", [])


def test_configure_backs_up_once_prepends_and_cleanup_restores(tmp_path: Path) -> None:
    certs = tmp_path / "certs.d"
    (certs / "docker.io").mkdir(parents=True)
    (certs / "docker.io" / "hosts.toml").write_text(
        'server = "https://registry-1.docker.io"\n\n'
        '[host."https://mirror.example.com"]\n'
        '  capabilities = ["pull"]\n'
        "  skip_verify = true\n"
        '  [host."https://mirror.example.com".header]\n'
        '    X-Token = ["abc"]\n'
    )
    (certs / "docker.io" / "ca.crt").write_text("CERT\n")
    (certs / "quay.io").mkdir()
    (certs / "quay.io" / "hosts.toml").write_text('server = "https://quay.io"\n')
    before = snapshot(certs)

    cfg = MirrorConfig(
        config_path=str(certs),
        mirrored_registries=("https://docker.io", "https://ghcr.io"),
        mirror_targets=("http://127.0.0.1:30020",),
        prepend_existing=True,
    )
    written = configure(cfg)
    assert [Path(p).relative_to(certs).as_posix() for p in written] == [
        "docker.io/hosts.toml",
        "ghcr.io/hosts.toml",
    ]
    golden("prepend_docker_io.toml", (certs / "docker.io" / "hosts.toml").read_text())
    golden("ghcr_io.toml", (certs / "ghcr.io" / "hosts.toml").read_text())
    assert (certs / "docker.io" / "ca.crt").read_text() == "CERT\n"
    assert not (certs / "quay.io").exists()
    backup = snapshot(certs / "_backup")
    assert backup == before

    # A second install keeps the first backup and rewrites without prepend.
    configure(MirrorConfig(config_path=str(certs), mirror_targets=("http://127.0.0.1:30020",)))
    assert snapshot(certs / "_backup") == before
    assert sorted(p.name for p in certs.iterdir()) == ["_backup", "_default"]

    assert cleanup(str(certs)) is True
    assert snapshot(certs) == before
    assert cleanup(str(certs)) is False


def test_cleanup_of_a_fresh_node_leaves_an_empty_dir(tmp_path: Path) -> None:
    certs = tmp_path / "certs.d"
    assert (
        main(
            [
                "configuration",
                f"--containerd-registry-config-path={certs}",
                "--mirror-targets",
                "http://127.0.0.1:30020",
            ],
            environ={},
        )
        == 0
    )
    golden("cli_default.toml", (certs / "_default" / "hosts.toml").read_text())
    assert main(["cleanup", f"--containerd-registry-config-path={certs}"], environ={}) == 0
    assert list(certs.iterdir()) == []


def test_configuration_requires_targets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["configuration", f"--containerd-registry-config-path={tmp_path}"], environ={})
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--mirror-targets" in err[0]


def test_configuration_from_env(tmp_path: Path) -> None:
    env = {
        "CONTAINERD_REGISTRY_CONFIG_PATH": str(tmp_path),
        "MIRRORED_REGISTRIES": "https://docker.io,http://10.213.0.2:5000",
        "MIRROR_TARGETS": "http://127.0.0.1:30020",
        "RESOLVE_TAGS": "false",
    }
    assert main(["configuration"], environ=env) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["10.213.0.2:5000", "_backup", "docker.io"]
    data = tomllib.loads((tmp_path / "10.213.0.2:5000" / "hosts.toml").read_text())
    assert data["server"] == "http://10.213.0.2:5000"
    assert data["host"]["http://127.0.0.1:30020"]["capabilities"] == ["pull"]


def test_cleanup_serves_readyz_and_cleanup_wait_sees_it(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    from tests.agent.runtime.test_run import free_port

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            "cleanup",
            f"--containerd-registry-config-path={tmp_path}",
            "--addr",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        waiter = subprocess.run(
            [
                sys.executable,
                "-m",
                "agent",
                "cleanup-wait",
                "--probe-endpoint",
                f"127.0.0.1:{port}",
                "--threshold",
                "2",
                "--period",
                "200ms",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert waiter.returncode == 0, waiter.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(15) == 0


async def test_cleanup_wait_probes_every_address_with_bounded_concurrency() -> None:
    """25 cleanup pods (loopback addresses 127.0.0.10-34 on one port, real sockets); the last one
    is not ready at first: cleanup-wait must not finish until it is, and never runs more than 10
    probes at once."""
    import trio

    from agent.config import HostPort
    from agent.node.hosts_toml import _probe_readyz, wait_for_cleanup
    from tests.agent.runtime.test_run import free_port

    port = free_port()
    ips = [f"127.0.0.{n}" for n in range(10, 35)]
    late = ips[-1]
    ready = {ip: ip != late for ip in ips}
    answered: dict[str, int] = dict.fromkeys(ips, 0)

    async def serve(ip: str, stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                data += chunk
            answered[ip] += 1
            status = b"200 OK" if ready[ip] else b"503 Service Unavailable"
            await stream.send_all(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\n\r\n")

    in_flight = 0
    most = 0

    async def counting_probe(ip: str, probe_port: int) -> bool:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await trio.sleep(0.01)
            return await _probe_readyz(ip, probe_port)
        finally:
            in_flight -= 1

    async def lookup(host: str) -> list[str]:
        assert host == "cleanup.example"
        return list(ips)

    rounds_before_ready = 0
    async with trio.open_nursery() as nursery:
        for ip in ips:
            listeners = await trio.open_tcp_listeners(port, host=ip)
            nursery.start_soon(trio.serve_listeners, functools.partial(serve, ip), listeners)
        done = trio.Event()

        async def waiter() -> None:
            await wait_for_cleanup(
                HostPort("cleanup.example", port), 2, 0.05, lookup=lookup, probe=counting_probe
            )
            done.set()

        nursery.start_soon(waiter)
        with trio.fail_after(20):
            while answered[late] < 4:
                assert not done.is_set(), "finished while one cleanup pod was not ready"
                await trio.sleep(0.01)
            rounds_before_ready = answered[late]
            ready[late] = True
            await done.wait()
        nursery.cancel_scope.cancel()
    assert rounds_before_ready >= 4
    assert all(count >= 5 for count in answered.values())  # every address, every round
    assert 1 < most <= 10


def test_basic_auth_header_for_every_target(tmp_path: Path) -> None:
    """`configuration` with a basic-auth directory: an Authorization header under each of our
    mirror targets (not under prepended ones), in a file only root can read."""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "username").write_text("hello\n")
    (secret / "password").write_text("world")
    certs = tmp_path / "certs.d"
    (certs / "docker.io").mkdir(parents=True)
    (certs / "docker.io" / "hosts.toml").write_text(
        "[host.'https://mirror.example']\ncapabilities = ['pull']\n"
    )
    env = {
        "CONTAINERD_REGISTRY_CONFIG_PATH": str(certs),
        "MIRRORED_REGISTRIES": "https://docker.io",
        "MIRROR_TARGETS": "http://10.0.0.5:30020,http://10.0.0.5:30021",
        "PREPEND_EXISTING": "true",
    }
    argv = ["configuration", "--basic-auth-dir", str(secret)]
    assert main(argv, environ=env) == 0
    path = certs / "docker.io" / "hosts.toml"
    text = path.read_text()
    golden("docker_io_basic_auth.toml", text)
    data = tomllib.loads(text)
    header = {"Authorization": "Basic aGVsbG86d29ybGQ="}  # Spegel's test vector: hello:world
    assert data["host"]["http://10.0.0.5:30020"]["header"] == header
    assert data["host"]["http://10.0.0.5:30021"]["header"] == header
    assert "header" not in data["host"]["https://mirror.example"]
    assert path.stat().st_mode & 0o777 == 0o600
    # the env twin; and without credential files no header and a world-readable file
    env["BASIC_AUTH_DIR"] = str(tmp_path / "none")
    assert main(["configuration"], environ=env) == 0
    assert "header" not in path.read_text() and path.stat().st_mode & 0o777 == 0o644


def test_unusable_basic_auth_files_stop_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "username").write_text("a:b")
    env = {"CONTAINERD_REGISTRY_CONFIG_PATH": str(tmp_path / "certs.d")}
    argv = ["configuration", "--mirror-targets", "http://10.0.0.5:30020"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--basic-auth-dir", str(tmp_path)], environ=env)
    assert exit_info.value.code == 2
    assert "cannot contain ':'" in capsys.readouterr().err
    assert not (tmp_path / "certs.d").exists()  # nothing touched


def test_registry_dirs_added_after_the_first_install_survive_a_reinstall(tmp_path: Path) -> None:
    certs = tmp_path / "certs.d"
    targets = ("http://127.0.0.1:30020",)
    configure(MirrorConfig(config_path=str(certs), mirror_targets=targets))  # first install
    first_backup = snapshot(certs / "_backup")
    # the admin adds two registries later; spegla will mirror one of them on the next install
    added = {"internal.example:5000": 'server = "https://internal.example:5000"\n',
             "docker.io": '[host."https://cache.example"]\ncapabilities = ["pull"]\n'}  # fmt: skip
    for name, text in added.items():
        (certs / name).mkdir()
        (certs / name / "hosts.toml").write_text(text)
    (certs / "docker.io" / "ca.crt").write_text("CERT\n")

    configure(
        MirrorConfig(
            config_path=str(certs),
            mirrored_registries=("https://docker.io",),
            mirror_targets=targets,
        )
    )
    # untouched where spegla does not write; moved into the backup where it does
    assert (certs / "internal.example:5000" / "hosts.toml").read_text() == added[
        "internal.example:5000"
    ]
    assert (certs / "_backup" / "docker.io" / "hosts.toml").read_text() == added["docker.io"]
    assert (certs / "_backup" / "docker.io" / "ca.crt").read_text() == "CERT\n"
    assert tomllib.loads((certs / "docker.io" / "hosts.toml").read_text())["host"]
    assert not (certs / "_default").exists()  # the first install's own directory is replaced

    assert cleanup(str(certs)) is True
    after = snapshot(certs)
    assert after["docker.io/hosts.toml"] == added["docker.io"]
    assert after["internal.example:5000/hosts.toml"] == added["internal.example:5000"]
    assert {k: v for k, v in after.items() if not k.startswith(tuple(added))} == first_backup


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.text(), min_size=1, max_size=4),
    keys=st.lists(st.text(min_size=1), min_size=1, max_size=3),
)
def test_any_value_round_trips_through_a_toml_parser(values: list[str], keys: list[str]) -> None:
    """Prepended mirror tables come from a file on the node and are written back: whatever they
    hold (control characters, quotes, newlines, any unicode) must parse back unchanged."""
    old = {
        f"https://m{i}.example": {"capabilities": ["pull"], "header": {k: values}}
        for i, k in enumerate(keys)
    }
    headers = {"Authorization": values[0]}
    text = render_hosts_toml("https://r.example", ["http://10.0.0.5:30020"], headers=headers,
                             existing_hosts=old)  # fmt: skip
    data = tomllib.loads(text)
    assert data["host"]["http://10.0.0.5:30020"]["header"] == headers
    for url, table in old.items():
        assert data["host"][url] == table


@pytest.mark.parametrize("registry", ["http://a\x01b:5000", "http://a\udcffb", "http://é.example"])
def test_unusable_registry_names_are_usage_errors(
    registry: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["configuration", f"--containerd-registry-config-path={tmp_path / 'c'}",
            "--mirror-targets", "http://127.0.0.1:30020",
            "--mirrored-registries", registry]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(argv, environ={})
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "printable ASCII" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()


def test_unwritable_config_path_is_one_error_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = ["configuration", f"--containerd-registry-config-path={blocker}",
            "--mirror-targets", "http://127.0.0.1:30020"]  # fmt: skip
    assert main(argv, environ={}) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out


def test_configuration_logs_the_containerd_settings_for_each_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    certs = tmp_path / "certs.d"
    argv = ["configuration", f"--containerd-registry-config-path={certs}",
            "--mirror-targets", "http://127.0.0.1:30020"]  # fmt: skip
    with caplog.at_level("INFO", logger="agent.node.hosts_toml"):
        assert main(argv, environ={}) == 0
    record = next(r for r in caplog.records if hasattr(r, "containerd_2x_config"))
    v3 = tomllib.loads(record.containerd_2x_config)
    v2 = tomllib.loads(record.containerd_1x_config)
    assert v3["plugins"]["io.containerd.cri.v1.images"]["registry"]["config_path"] == str(certs)
    assert v2["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"] == str(certs)
