"""`spegla doctor`: the pure decisions (CRI config shapes of containerd 1.6, 1.7 and 2.x,
hosts.toml, peers), then the real command against real containerd configured wrong in each way,
and on a two-node namespace cluster with running agents (all checks pass; a dead peer fails one)."""

from __future__ import annotations

import fnmatch
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.containerd.config_files import effective_settings
from agent.doctor import checks as dc
from agent.doctor.probes import content_facts, local_addresses
from tests.harness.containerd import LINE_1_6, Containerd, Line

REPO = Path(__file__).resolve().parents[3]

# What `crictl info` shows under "config" (abridged to the fields that matter plus neighbours).
CRI_1_6 = {
    "containerd": {"snapshotter": "overlayfs", "discardUnpackedLayers": False, "runtimes": {}},
    "registry": {"configPath": "/etc/containerd/certs.d", "mirrors": None, "configs": None},
    "enableSelinux": False,
}
CRI_1_7 = {
    "containerd": {
        "snapshotter": "overlayfs",
        "defaultRuntimeName": "runc",
        "discardUnpackedLayers": True,
        "ignoreBlockIONotEnabledErrors": False,
    },
    "registry": {"configPath": "/etc/containerd/certs.d:/etc/docker/certs.d", "headers": None},
    "imageDecryption": {"keyModel": "node"},
}
CRI_2_X = {  # the runtime plugin's settings only: image settings moved to cri.v1.images
    "containerd": {"defaultRuntimeName": "runc", "runtimes": {"runc": {}}},
    "cni": {"binDir": "/opt/cni/bin"},
    "containerdRootDir": "/var/lib/containerd",
}


def test_cri_info_shapes_of_1_6_and_1_7() -> None:
    six = dc.from_cri_info({"config": json.dumps(CRI_1_6), "golang": '"go1.19"'})
    assert six is not None
    assert (six.config_path, six.discard_unpacked_layers) == ("/etc/containerd/certs.d", False)
    seven = dc.from_cri_info({"config": json.dumps(CRI_1_7)})
    assert seven is not None and seven.discard_unpacked_layers is True
    # 1.7 splits a `:` list itself (no transfer service for CRI): one of two paths is enough
    assert dc.check_config_path(seven, "/etc/containerd/certs.d/", (1, 7)).ok
    assert not dc.check_discard(seven, 1).ok
    assert "io.containerd.grpc.v1.cri" in dc.check_discard(seven, 1).fix  # a version-2 snippet


def test_containerd_2_settings_come_from_the_config_files() -> None:
    assert dc.from_cri_info({"config": json.dumps(CRI_2_X)}) is None
    assert dc.from_cri_info({"config": "not json"}) is None
    assert dc.from_cri_info({}) is None
    files = {
        "/etc/containerd/config.toml": 'version = 3\nimports = ["conf.d/*.toml"]\n'
        '[plugins."io.containerd.cri.v1.images"]\n  discard_unpacked_layers = true\n',
        "/etc/containerd/conf.d/10-spegla.toml": 'version = 3\n[plugins."io.containerd.cri.v1.'
        'images".registry]\n  config_path = "/etc/containerd/certs.d:/etc/docker/certs.d"\n',
    }
    settings = effective_settings(
        "/etc/containerd/config.toml",
        lambda p: files[p],
        lambda pattern: [p for p in files if fnmatch.fnmatch(p, pattern)],
    )
    cfg = dc.from_settings(settings)
    assert cfg.discard_unpacked_layers is True and cfg.config_version == 3
    assert cfg.config_path_from == "/etc/containerd/conf.d/10-spegla.toml"
    check = dc.check_config_path(cfg, "/etc/containerd/certs.d", (2, 2))
    assert not check.ok and "ONE directory" in check.result and "10-spegla.toml" in check.result
    assert 'config_path = "/etc/containerd/certs.d"' in check.fix
    assert "use_local_image_pull = true" in check.fix
    # 2.0 pulls for CRI without the transfer service: the list is read directory by directory
    assert dc.check_config_path(cfg, "/etc/containerd/certs.d", (2, 0)).ok
    local = dc.CriImageConfig("f", "/etc/containerd/certs.d:/x", False, use_local_image_pull=True)
    assert dc.check_config_path(local, "/etc/containerd/certs.d", (2, 2)).ok
    # a version-2 file on 2.x: both fixes as version-2 text (a newer drop-in would be refused)
    v2 = dc.from_settings(
        effective_settings(
            "/c.toml",
            lambda p: (
                'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n'
                '  config_path = "/etc/containerd/certs.d:/x"\n'
            ),
            list,
        )
    )
    fix = dc.check_config_path(v2, "/etc/containerd/certs.d", (2, 2)).fix
    assert fix.count("version = 2") == 2 and "version = 3" not in fix
    assert '[plugins."io.containerd.grpc.v1.cri".registry]' in fix
    # nothing set anywhere: not ours, whatever containerd's built-in default is
    unset = dc.from_settings(effective_settings("/c.toml", lambda p: "version = 3\n", list))
    check = dc.check_config_path(unset, "/etc/containerd/certs.d", (2, 2))
    assert not check.ok and "not set" in check.result
    assert '[plugins."io.containerd.cri.v1.images".registry]' in check.fix
    assert dc.check_discard(unset, 2).ok  # false unless set


def test_versions() -> None:
    assert dc.major_version("1.6.20~ds1") == 1
    assert dc.major_version("v2.1.0") == 2
    assert dc.major_version("") is None
    assert dc.version_tuple("v2.2.7") == (2, 2)
    assert dc.version_tuple("1.7.0-rc.1") == (1, 7)
    assert dc.version_tuple("2") == (2, 0)
    assert dc.version_tuple("dev") is None
    assert dc.transfer_service_pulls((2, 1), None)
    assert not dc.transfer_service_pulls((2, 0), None)
    assert not dc.transfer_service_pulls((1, 7), None)
    assert dc.transfer_service_pulls((3, 0), dc.CriImageConfig("f", "/a", False, False))
    assert not dc.transfer_service_pulls((2, 2), dc.CriImageConfig("f", "/a", False, True))


def _hosts(text: str | None) -> dc.HostsFile:
    return dc.HostsFile("_default", "/c/_default/hosts.toml", text)


def test_hosts_toml_must_name_this_agent_first() -> None:
    ours = '[host."http://10.0.0.5:30020"]\n  capabilities = ["pull"]\n'
    theirs = '[host."http://mirror.example:5000"]\n' + ours
    ips = ["127.0.0.1", "10.0.0.5"]
    assert dc.check_hosts_toml([_hosts(ours)], ["http://10.0.0.5:30020"], ips, 5000).ok
    assert dc.check_hosts_toml([_hosts(ours)], ["http://10.0.0.5:30020/"], [], 5000).ok
    bad = dc.check_hosts_toml([_hosts(theirs)], ["http://10.0.0.5:30020"], ips, 5000)
    assert not bad.ok and "mirror.example" in bad.result
    # no targets given: an address of this machine on the registry port
    assert dc.check_hosts_toml([_hosts(ours)], [], ips, 30020).ok
    assert not dc.check_hosts_toml([_hosts(ours)], [], ["127.0.0.1"], 30020).ok
    assert "missing" in dc.check_hosts_toml([_hosts(None)], [], ips, 5000).result
    assert "not valid TOML" in dc.check_hosts_toml([_hosts("[host")], [], ips, 5000).result
    assert "no [host]" in dc.check_hosts_toml([_hosts('server = "x"')], [], ips, 5000).result


def test_peer_checks_and_rendering() -> None:
    assert not dc.check_peers(0, None, standalone=False).ok
    assert dc.check_peers(0, None, standalone=True).ok
    assert dc.check_peers(3, None, standalone=False).ok
    assert not dc.check_peers(None, "debug page off", standalone=False).ok
    assert dc.check_peer_registry([], None, [], 0).ok
    assert not dc.check_peer_registry(["a:5000"], None, ["a:5000 refused"], 1).ok
    assert dc.check_peer_registry(["a:5000", "b:5000"], "b:5000", ["a:5000 refused"], 2).ok
    checks = [dc.Check("one", True, "fine"), dc.Check("two", False, "broken " * 20, "fix it")]
    table = dc.render_table(checks, width=80)
    assert table.splitlines()[0].split() == ["CHECK", "RESULT", "/", "what", "to", "do"]
    assert "1 of 2 check(s) failed" in table and "-> fix it" in table
    assert table.splitlines()[2].split()[:3] == ["one", "ok", "fine"]
    assert table.splitlines()[3].split()[:3] == ["two", "!!", "broken"]
    assert all(len(line) <= 80 for line in table.splitlines())
    doc = json.loads(dc.render_json(checks))
    assert doc["ok"] is False and [c["name"] for c in doc["checks"]] == ["one", "two"]


def test_content_directory(tmp_path: Path) -> None:
    # containerd 2.x creates it at the first pull: fine while containerd's root exists
    assert content_facts(str(tmp_path / "absent")) == (None, None)
    assert dc.check_content(str(tmp_path / "absent"), None, None).ok
    gone = content_facts(str(tmp_path / "no-root" / "content"))
    assert gone[1] is not None and not dc.check_content("x", *gone).ok
    assert content_facts(str(tmp_path)) == (0, None)  # nothing pulled yet
    blobs = tmp_path / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (blobs / ("a" * 64)).write_bytes(b"x")
    assert content_facts(str(tmp_path)) == (1, None)
    assert "127.0.0.1" in local_addresses()


# --- the real command ---------------------------------------------------------------------------


def doctor(*args: str, netns: str | None = None) -> tuple[int, dict[str, dict[str, Any]]]:
    argv = [sys.executable, "-m", "agent", "doctor", "--json", "--probe-timeout", "1s", *args]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.stdout, out.stderr
    report = json.loads(out.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] is (out.returncode == 0)
    return out.returncode, checks


def node_args(c: Containerd, *extra: str) -> list[str]:
    return [
        "--containerd-sock", str(c.socket),
        "--containerd-registry-config-path", str(c.certs_d),
        "--containerd-content-path", str(c.content_path),
        *extra,
    ]  # fmt: skip


def _no_agent() -> list[str]:  # ports nobody listens on
    return ["--registry-addr", "127.0.0.1:9", "--router-addr", "127.0.0.1:9",
            "--metrics-addr", "127.0.0.1:9"]  # fmt: skip


@pytest.mark.root
def test_doctor_against_containerd_configured_wrong(
    containerd_factory: Callable[..., Containerd], containerd_line: Line
) -> None:
    good = containerd_factory("good")
    code, checks = doctor(*node_args(good), *_no_agent())
    assert code == 1
    version = "1.6" if containerd_line is LINE_1_6 else "2.2"
    assert checks["containerd"]["ok"] and version in checks["containerd"]["result"]
    assert checks["registry config_path"]["ok"], checks["registry config_path"]
    assert checks["discard_unpacked_layers"]["ok"]
    assert checks["content directory"]["ok"]
    assert not checks["hosts.toml"]["ok"] and "missing" in checks["hosts.toml"]["result"]
    for port in ("registry port", "dht port", "metrics port"):
        assert not checks[port]["ok"], checks[port]
        assert "refused" in checks[port]["result"].lower(), checks[port]

    unset = containerd_factory("unset", registry_config_path="")
    _, checks = doctor(*node_args(unset), *_no_agent())
    assert not checks["registry config_path"]["ok"]
    assert "not set" in checks["registry config_path"]["result"]

    elsewhere = containerd_factory("elsewhere", registry_config_path="/etc/docker/certs.d")
    _, checks = doctor(*node_args(elsewhere), *_no_agent())
    assert "does not include" in checks["registry config_path"]["result"]

    discarding = containerd_factory("discard", discard_unpacked_layers=True)
    _, checks = doctor(*node_args(discarding), *_no_agent())
    assert not checks["discard_unpacked_layers"]["ok"]
    assert checks["registry config_path"]["ok"]

    # hosts.toml written, but for another mirror; then for this agent
    good.write_hosts_toml("_default", "", ["http://mirror.invalid:5000"])
    _, checks = doctor(*node_args(good), *_no_agent())
    assert "mirror.invalid" in checks["hosts.toml"]["result"] and not checks["hosts.toml"]["ok"]
    good.write_hosts_toml("_default", "", ["http://127.0.0.1:30020"])
    _, checks = doctor(*node_args(good, "--mirror-targets", "http://127.0.0.1:30020"))
    assert checks["hosts.toml"]["ok"], checks["hosts.toml"]

    _, checks = doctor(*node_args(good), "--containerd-content-path", "/nonexistent/content")
    assert not checks["content directory"]["ok"]

    good.stop()
    code, checks = doctor(*node_args(good), *_no_agent())
    assert code == 1 and not checks["containerd"]["ok"]
    assert "registry config_path" not in checks  # nothing to ask without containerd


@pytest.mark.root
@pytest.mark.slow
def test_doctor_passes_on_a_working_node_and_names_an_unreachable_peer(
    cluster: Callable[..., Any],
) -> None:
    from tests.harness.agents import start_agents, stop_agent
    from tests.harness.cluster import UPSTREAM_HOST

    c = cluster(nodes=2)
    start_agents(c)
    one, two = c.nodes
    args = node_args(one.containerd, "--mirrored-registries", f"http://{UPSTREAM_HOST}")
    code, checks = doctor(*args, netns=one.netns)
    assert code == 0, {k: v for k, v in checks.items() if not v["ok"]}
    assert checks["dht peers"]["result"].startswith("1 peer")
    assert checks["peer registry port"]["result"] == f"{two.ip}:5000 accepts TCP"

    stop_agent(c, two)
    code, checks = doctor(*args, netns=one.netns)
    assert code == 1
    if checks["dht peers"]["ok"]:  # node one still lists node two: its port is closed now
        assert not checks["peer registry port"]["ok"]
        assert two.ip in checks["peer registry port"]["result"]
    else:  # node one already dropped it
        assert checks["dht peers"]["result"].startswith("0 peers")
