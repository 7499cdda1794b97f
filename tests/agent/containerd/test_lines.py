"""The harness's containerd lines: 2.x runs its own `config default` plus spegla's settings.

Pure checks of the generated configs (the 2.x default comes from the real binary); that the 2.x
transfer service honours the hosts.toml is shown end to end by tests/e2e/test_cluster_standin.py
(every node's mirror gets the CRI pull's requests on both lines).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import tomli_w

from tests.harness.containerd import (
    LINE_2_2,
    Containerd,
    Paths,
    config_v2,
    config_v3,
    default_config,
    hosts_toml,
)


def test_hosts_toml_parses_with_a_host_table_per_mirror() -> None:
    doc = tomllib.loads(hosts_toml("http://up:5000", ["http://127.0.0.1:5000", "http://[::1]:1"]))
    assert doc["server"] == "http://up:5000"
    assert doc["host"]["http://127.0.0.1:5000"]["capabilities"] == ["pull", "resolve"]
    assert set(doc["host"]) == {"http://127.0.0.1:5000", "http://[::1]:1"}


def test_version_2_config_points_cri_at_the_one_certs_dir(tmp_path: Path) -> None:
    cfg = config_v2(Paths(tmp_path, tmp_path / "s.sock", tmp_path / "certs.d"))
    cri = cfg["plugins"]["io.containerd.grpc.v1.cri"]
    assert cfg["version"] == 2
    assert cri["registry"]["config_path"] == str(tmp_path / "certs.d")
    assert cri["containerd"]["discard_unpacked_layers"] is False


def test_version_3_config_is_the_release_default_plus_spegla_settings(tmp_path: Path) -> None:
    if LINE_2_2.missing():
        pytest.skip(LINE_2_2.missing() or "")
    default = default_config(LINE_2_2)
    cfg = config_v3(default, Paths(tmp_path, tmp_path / "s.sock", tmp_path / "certs.d"))
    tomllib.loads(tomli_w.dumps(cfg))  # writable and readable again
    assert cfg["version"] == default["version"] == 3
    images = cfg["plugins"]["io.containerd.cri.v1.images"]
    assert images["registry"]["config_path"] == str(tmp_path / "certs.d")
    assert ":" not in images["registry"]["config_path"]
    assert images["discard_unpacked_layers"] is False
    assert cfg["imports"] == [str(tmp_path / "conf.d" / "*.toml")]
    assert cfg["root"] == str(tmp_path / "root") and cfg["grpc"]["address"] == str(
        tmp_path / "s.sock"
    )
    # nothing else of the release's default is dropped
    assert set(cfg["plugins"]) == set(default["plugins"])
    assert default["root"] == "/var/lib/containerd"  # the default itself is not modified


def test_misconfigurations_reach_the_written_config(tmp_path: Path) -> None:
    if LINE_2_2.missing():
        pytest.skip(LINE_2_2.missing() or "")
    c = Containerd(tmp_path, line=LINE_2_2, registry_config_path="", discard_unpacked_layers=True)
    images = c.config()["plugins"]["io.containerd.cri.v1.images"]
    assert "config_path" not in images["registry"]
    assert images["discard_unpacked_layers"] is True


def test_an_absent_line_says_why(tmp_path: Path) -> None:
    from tests.harness.containerd import Line

    reason = Line("ctrd9.9", 9, tmp_path / "9.9.9").missing()
    assert reason is not None and "containerd-shim-runc-v2" in reason and "9.9.9" in reason
