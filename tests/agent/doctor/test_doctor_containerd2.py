"""`spegla doctor` on containerd 2.x: its reading of the config files matches containerd's own
(`containerd config dump`), and on real 2.x daemons configured right and wrong its verdict matches
what a CRI pull through a recording mirror actually does.

The mirror is the harness's stand-in (logs every request, answers 404, containerd then falls back
to the upstream), on loopback; the upstream is the session's loopback registry.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.containerd import snippets as snippets
from agent.containerd.config_files import (
    MAX_FILES,
    effective_settings,
    read_settings,
    split_host_path,
)
from agent.doctor.probes import config_flag
from tests.agent.doctor.test_doctor import _no_agent, doctor, node_args
from tests.harness.containerd import LINE_2_2, Containerd, default_config
from tests.harness.cri import CriClient
from tests.harness.fixtures import short_tempdir
from tests.harness.procs import Daemon
from tests.harness.standin_mirror import read_log
from tests.harness.upstream import Upstream

REPO = Path(__file__).resolve().parents[3]
ON_2X = pytest.mark.parametrize("containerd_line", [LINE_2_2], indirect=True, ids=[LINE_2_2.id])


def needs_2x() -> None:
    if LINE_2_2.missing():
        pytest.skip(LINE_2_2.missing() or "")


# --- the reading, against containerd's own -------------------------------------------------------


def dump(config: Path) -> dict[str, Any]:
    out = subprocess.run(
        [LINE_2_2.binary("containerd"), "--config", str(config), "config", "dump"],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    return tomllib.loads(out.stdout)


CASES: dict[str, dict[str, str]] = {
    "v3 drop-in adds to the main file": {
        "config.toml": 'version = 3\nimports = ["conf.d/*.toml"]\n'
        '[plugins."io.containerd.cri.v1.images"]\n  discard_unpacked_layers = true\n'
        '[plugins."io.containerd.cri.v1.images".registry]\n  config_path = "/main/certs.d"\n',
        "conf.d/10.toml": 'version = 3\n[plugins."io.containerd.cri.v1.images"]\n'
        "  use_local_image_pull = true\n",
    },
    "later drop-in wins": {
        "config.toml": 'version = 3\nimports = ["conf.d/*.toml", "extra.toml"]\n',
        "conf.d/a.toml": 'version = 3\n[plugins."io.containerd.cri.v1.images".registry]\n'
        '  config_path = "/a"\n',
        "conf.d/b.toml": 'version = 3\n[plugins."io.containerd.cri.v1.images".registry]\n'
        '  config_path = "/b:/c"\n',
        "extra.toml": 'version = 3\n[plugins."io.containerd.cri.v1.images"]\n'
        "  discard_unpacked_layers = true\n",
    },
    "version 2 migrated, discard kept with runtimes": {
        "config.toml": 'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n'
        '  config_path = "/v2/certs.d"\n[plugins."io.containerd.grpc.v1.cri".containerd]\n'
        "  discard_unpacked_layers = true\n"
        '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n'
        '  runtime_type = "io.containerd.runc.v2"\n',
    },
    "version 2 without runtimes loses discard": {
        "config.toml": 'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n'
        "  discard_unpacked_layers = true\n",
    },
    "version 2 file carrying the 2.x images table": {
        "config.toml": 'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n'
        '  config_path = "/a:/b"\n[plugins."io.containerd.cri.v1.images"]\n'
        "  use_local_image_pull = true\n",
    },
    "imports of imports, absolute and relative": {
        "config.toml": 'version = 3\nimports = ["sub/one.toml"]\n',
        "sub/one.toml": 'version = 3\nimports = ["two.toml"]\n',
        "sub/two.toml": 'version = 3\n[plugins."io.containerd.cri.v1.images".registry]\n'
        '  config_path = "/deep"\n',
    },
}


@pytest.mark.parametrize("case", list(CASES))
def test_reading_matches_containerd_config_dump(case: str, tmp_path: Path) -> None:
    needs_2x()
    for name, text in CASES[case].items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    theirs = dump(tmp_path / "config.toml")["plugins"]["io.containerd.cri.v1.images"]
    ours = read_settings(str(tmp_path / "config.toml"))
    assert ours.errors == ()
    assert (ours.config_path.value or "") == theirs["registry"]["config_path"]
    assert bool(ours.discard_unpacked_layers.value) == theirs["discard_unpacked_layers"]
    assert bool(ours.use_local_image_pull.value) == theirs["use_local_image_pull"]


def test_default_config_of_2x_is_not_ready_for_spegla(tmp_path: Path) -> None:
    """`containerd config default`, unmodified: config_path empty, so hosts.toml is never read."""
    needs_2x()
    text = subprocess.run(
        [LINE_2_2.binary("containerd"), "config", "default"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    from agent.doctor import checks as dc

    cfg = dc.from_settings(effective_settings("/etc/containerd/config.toml", lambda p: text, list))
    assert cfg.config_version == 3 and cfg.config_path == ""
    check = dc.check_config_path(cfg, "/etc/containerd/certs.d", (2, 2))
    assert not check.ok and "not set" in check.result
    assert '[plugins."io.containerd.cri.v1.images".registry]' in check.fix
    assert dc.check_discard(cfg, 2).ok


def test_imports_are_bounded_and_missing_ones_are_named() -> None:
    files = {"/c.toml": 'imports = ["/c.toml", "/gone.toml", "/loop/*.toml"]'}
    files |= {f"/loop/{i}.toml": 'imports = ["/loop/*.toml"]' for i in range(MAX_FILES + 5)}

    def read(path: str) -> str:
        if path not in files:
            raise FileNotFoundError(2, "No such file or directory")
        return files[path]

    got = effective_settings(
        "/c.toml", read, lambda pat: [p for p in files if p.startswith("/loop/")]
    )
    assert len(got.files) == MAX_FILES
    assert any("/gone.toml" in e for e in got.errors)
    assert any("not read" in e for e in got.errors)
    bad = effective_settings("/c.toml", lambda p: "version = [", list)
    assert bad.files == () and "not valid TOML" in bad.errors[0]


def test_command_line_and_host_paths() -> None:
    assert config_flag(["containerd", "--config", "/x/c.toml"]) == "/x/c.toml"
    assert config_flag(["containerd", "-c=/y.toml", "--log-level", "debug"]) == "/y.toml"
    assert config_flag(["/usr/bin/containerd"]) is None
    assert (
        split_host_path("/host/etc/containerd/config.toml", "/host")
        == "/etc/containerd/config.toml"
    )
    assert split_host_path("/etc/containerd/config.toml", "") == "/etc/containerd/config.toml"
    assert split_host_path("/hostile/x", "/host") == "/hostile/x"


def test_snippets_are_valid_toml_for_each_line() -> None:
    hostile = '/etc/a "b"\\c\x01'
    v3 = tomllib.loads(snippets.spegla_settings(3, hostile))
    images = v3["plugins"]["io.containerd.cri.v1.images"]
    assert v3["version"] == 3 and images["registry"]["config_path"] == hostile
    assert images["discard_unpacked_layers"] is False
    v2 = tomllib.loads(snippets.spegla_settings(2, hostile))
    cri = v2["plugins"]["io.containerd.grpc.v1.cri"]
    assert v2["version"] == 2 and cri["registry"]["config_path"] == hostile
    assert cri["containerd"]["discard_unpacked_layers"] is False
    for version in (2, 3):
        local = tomllib.loads(snippets.local_image_pull(version))
        assert local["version"] == version
        assert local["plugins"]["io.containerd.cri.v1.images"]["use_local_image_pull"] is True
    assert snippets.config_version_for(1) == 2 and snippets.config_version_for(2) == 3


# --- real containerd 2.x: what doctor says and what a CRI pull does ------------------------------


@pytest.fixture
def mirror() -> Iterator[tuple[str, Path]]:
    """The stand-in mirror on a loopback port: (url, log path)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = short_tempdir("spg-mirror-") / "mirror.jsonl"
    argv = [sys.executable, "-m", "tests.harness.standin_mirror",
            "--listen", f"127.0.0.1:{port}", "--log", str(log)]  # fmt: skip
    d = Daemon.start("standin-mirror", argv, log.with_suffix(".out"), cwd=REPO)
    from tests.harness import nsexec

    nsexec.wait_http(f"http://127.0.0.1:{port}/v2/", None, timeout=10)
    log.write_text("")
    yield f"http://127.0.0.1:{port}", log
    d.stop()


def pull_asks_mirror(c: Containerd, upstream: Upstream, mirror: tuple[str, Path]) -> bool:
    url, log = mirror
    c.write_hosts_toml(upstream.host, f"http://{upstream.host}", [url])
    log.write_text("")
    ref = upstream.pushed["small"]
    cri = CriClient(c.socket)
    cri.pull(ref, timeout=60)
    cri.remove(ref)
    return any(r.path.startswith("/v2/e2e/small/") for r in read_log(log))


def _images(cfg: dict[str, Any]) -> dict[str, Any]:
    images: dict[str, Any] = cfg["plugins"]["io.containerd.cri.v1.images"]
    return images


@pytest.mark.root
@ON_2X
def test_multi_directory_config_path_is_ignored_by_2x_and_doctor_fails_it(
    containerd_factory: Callable[..., Containerd],
    upstream_registry: Upstream,
    mirror: tuple[str, Path],
) -> None:
    good = containerd_factory("one-dir")
    assert pull_asks_mirror(good, upstream_registry, mirror)
    _, checks = doctor(*node_args(good), *_no_agent())
    assert checks["registry config_path"]["ok"], checks["registry config_path"]
    assert str(good.config_file) in checks["registry config_path"]["result"]

    listed = containerd_factory("two-dirs")
    listed.registry_config_path = f"{listed.certs_d}:/etc/docker/certs.d"
    listed.restart()
    assert not pull_asks_mirror(listed, upstream_registry, mirror)  # the silent trap
    _, checks = doctor(*node_args(listed), *_no_agent())
    check = checks["registry config_path"]
    assert not check["ok"] and "ONE directory" in check["result"]
    assert f'config_path = "{listed.certs_d}"' in check["fix"]
    assert "use_local_image_pull = true" in check["fix"]

    local = containerd_factory(
        "local-pull", customize=lambda cfg: _images(cfg).update(use_local_image_pull=True)
    )
    local.registry_config_path = f"/etc/docker/certs.d:{local.certs_d}"
    local.restart()
    assert pull_asks_mirror(local, upstream_registry, mirror)  # CRI's own resolver splits it
    _, checks = doctor(*node_args(local), *_no_agent())
    assert checks["registry config_path"]["ok"], checks["registry config_path"]


@pytest.mark.root
@ON_2X
def test_doctor_follows_imports_and_the_release_default(
    containerd_factory: Callable[..., Containerd],
    upstream_registry: Upstream,
    mirror: tuple[str, Path],
) -> None:
    default = default_config(LINE_2_2)
    blank = _images(default)["registry"]["config_path"]

    def as_released(cfg: dict[str, Any]) -> None:  # the release's image settings, untouched
        _images(cfg).clear()
        _images(cfg).update(copy.deepcopy(_images(default)))

    plain = containerd_factory("default", customize=as_released)
    assert _images(tomllib.loads(plain.config_file.read_text()))["registry"]["config_path"] == blank
    assert not pull_asks_mirror(plain, upstream_registry, mirror)
    _, checks = doctor(*node_args(plain), *_no_agent())
    assert not checks["registry config_path"]["ok"]
    assert "not set" in checks["registry config_path"]["result"]

    # a drop-in in the imports directory sets it: containerd follows it, so does doctor
    drop_in = plain.conf_d / "50-spegla.toml"
    drop_in.write_text(snippets.config_path_only(3, str(plain.certs_d)))
    plain.restart()
    assert pull_asks_mirror(plain, upstream_registry, mirror)
    _, checks = doctor(*node_args(plain), *_no_agent())
    assert checks["registry config_path"]["ok"], checks["registry config_path"]
    assert str(drop_in) in checks["registry config_path"]["result"]

    discarding = containerd_factory("discard", discard_unpacked_layers=True)
    _, checks = doctor(*node_args(discarding), *_no_agent())
    assert not checks["discard_unpacked_layers"]["ok"]
    assert "io.containerd.cri.v1.images" in checks["discard_unpacked_layers"]["fix"]


def test_host_files_are_read_under_the_mount(tmp_path: Path) -> None:
    """In the pod the host's /etc/containerd is mounted at /host/etc/containerd: the files' own
    absolute import paths are the host's, read under the mount; messages name host paths."""
    etc = tmp_path / "etc" / "containerd"
    (etc / "conf.d").mkdir(parents=True)
    (etc / "config.toml").write_text('version = 3\nimports = ["/etc/containerd/conf.d/*.toml"]\n')
    (etc / "conf.d" / "spegla.toml").write_text(
        snippets.config_path_only(3, "/etc/containerd/certs.d")
    )
    got = read_settings("/etc/containerd/config.toml", host_root=str(tmp_path))
    assert got.errors == ()
    assert got.files == ("/etc/containerd/config.toml", "/etc/containerd/conf.d/spegla.toml")
    assert got.config_path.value == "/etc/containerd/certs.d"
    assert got.config_path.source == "/etc/containerd/conf.d/spegla.toml"


def test_without_containerd_in_sight_the_flag_names_the_file(tmp_path: Path) -> None:
    from agent.doctor.probes import DoctorConfig, locate_config

    nobody = str(tmp_path / "no.sock")
    pod = locate_config(
        DoctorConfig(containerd_sock=nobody, containerd_config="/host/etc/containerd/config.toml")
    )
    assert (pod.path, pod.host_root) == ("/etc/containerd/config.toml", "/host")
    host = locate_config(DoctorConfig(containerd_sock=nobody, containerd_config="/etc/c.toml"))
    assert (host.path, host.host_root) == ("/etc/c.toml", "")
