"""The cluster key in the agent (issue 17): the key file and its flags, the start warning, the
doctor check, the debug feed's notice, and two in-process agents on loopback (the real DHT,
in-memory content) that resolve a tag through each other only when both hold the key."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from agent.cli.main import build_parser, doctor_config, registry_config
from agent.config import ConfigError, HostPort, RegistryConfig
from agent.doctor import checks as dc
from agent.doctor.probes import cluster_key_check
from agent.node.setup import read_cluster_key, trust_summary
from agent.observability.debug import DebugState
from agent.runtime.run import AgentHandle, Hooks, run_agent
from agent.runtime.wiring import Backend
from registry.interfaces import Router
from tests.agent.observability.test_debug_page import CHROMIUM_FLAGS
from tests.agent.runtime.test_run import config
from tests.fakes import MemoryContentStore
from tests.registry.conftest import Content, fill

KEY = b"a cluster key of 32 bytes, test\n"


def test_the_key_file(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"  " + KEY)
    assert read_cluster_key(str(key)) == KEY.strip()
    assert read_cluster_key("") is None
    assert read_cluster_key(str(tmp_path / "absent")) is None  # the optional Secret's empty dir
    for content, message in [
        (b"", "is empty"),
        (b"\n \n", "is empty"),
        (b"0123456789abcde", "at least 16 bytes"),
        (b"x" * 5000, "more than 4096"),
    ]:
        key.write_bytes(content)
        with pytest.raises(ConfigError, match=message):
            read_cluster_key(str(key))
    with pytest.raises(ConfigError, match="no such file"):
        read_cluster_key(str(tmp_path / "typo" / "key"))


def parse(*argv: str, environ: dict[str, str] | None = None) -> RegistryConfig:
    return registry_config(build_parser(environ or {}).parse_args(["registry", *argv]))


def test_flags_env_and_the_older_name() -> None:
    assert parse().cluster_key_file == ""
    assert parse("--cluster-key-file", "/k/key").cluster_key_file == "/k/key"
    assert parse("--dht-psk-file", "/k/key").cluster_key_file == "/k/key"
    env = {"CLUSTER_KEY_FILE": "/etc/spegla/cluster-key/key"}
    assert parse(environ=env).cluster_key_file == "/etc/spegla/cluster-key/key"
    assert parse(environ={"DHT_PSK_FILE": "/old/key"}).cluster_key_file == "/old/key"
    same = parse("--cluster-key-file", "/k/key", "--dht-psk-file", "/k/key")
    assert same.cluster_key_file == "/k/key"
    with pytest.raises(ConfigError, match="different files"):
        parse("--cluster-key-file", "/k/key", "--dht-psk-file", "/other/key")
    doctor = doctor_config(build_parser({}).parse_args(["doctor", "--dht-psk-file", "/k/key"]))
    assert doctor.cluster_key_file == "/k/key"


@pytest.mark.parametrize("keyed", [True, False])
def test_configuration_lets_mirrors_resolve_tags_only_with_the_key(
    keyed: bool, tmp_path: Path
) -> None:
    import tomllib

    from agent.cli.main import main

    key = tmp_path / "key-dir" / "key"
    key.parent.mkdir()
    if keyed:
        key.write_bytes(KEY)
    certs = tmp_path / "certs.d"
    env = {
        "CONTAINERD_REGISTRY_CONFIG_PATH": str(certs),
        "MIRROR_TARGETS": "http://127.0.0.1:30020",
        "CLUSTER_KEY_FILE": str(key),
        "RESOLVE_TAGS": "true",
    }
    assert main(["configuration"], environ=env) == 0
    data = tomllib.loads((certs / "_default" / "hosts.toml").read_text())
    expected = ["pull", "resolve"] if keyed else ["pull"]
    assert data["host"]["http://127.0.0.1:30020"]["capabilities"] == expected


def test_a_bad_key_file_stops_the_agent_with_one_line(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"short\n")
    out = subprocess.run(
        [sys.executable, "-m", "agent", "registry", "--cluster-key-file", str(key)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "at least 16 bytes" in lines[0], out.stderr


def test_doctor_warns_without_a_key_and_fails_on_a_bad_one(tmp_path: Path) -> None:
    missing = cluster_key_check(str(tmp_path / "key"))
    assert missing.ok and missing.warning and "never resolved through peers" in missing.result
    assert "create secret generic spegla-cluster-key" in missing.fix
    table = dc.render_table([missing], width=100)
    assert re.search(r"^cluster key\s+\?\?\s+no key at", table, re.M), table
    assert "1 warning(s)" in table and dc.passed([missing])
    assert json.loads(dc.render_json([missing]))["checks"][0]["warning"] is True
    (tmp_path / "key").write_bytes(b"tiny")
    bad = cluster_key_check(str(tmp_path / "key"))
    assert not bad.ok and "16 bytes" in bad.result
    (tmp_path / "key").write_bytes(KEY)
    good = cluster_key_check(str(tmp_path / "key"))
    assert good.ok and not good.warning


def test_the_debug_feed_carries_the_trust_notice() -> None:
    keyless = DebugState(trust=trust_summary(None, "/etc/spegla/cluster-key/key")).snapshot()
    assert keyless["trust"]["cluster_key"] is False
    assert keyless["trust"]["tags_through_peers"] is False
    assert "/etc/spegla/cluster-key/key" in keyless["trust"]["notice"]
    keyed = DebugState(trust=trust_summary(KEY, "/k")).snapshot()
    assert keyed["trust"] == {"cluster_key": True, "tags_through_peers": True, "notice": None}


def test_the_page_shows_the_notice() -> None:
    """The page's script, run by Chromium on a static copy fed one snapshot."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is installed by hack/setup.sh (as root)")
    page = (resources.files("agent.web") / "debug.html").read_text()
    shown: dict[bool, str] = {}
    for has_key in (False, True):
        state = DebugState(node_id="ab" * 32, clock=lambda: 1000.0)
        state.trust = trust_summary(KEY if has_key else None, "/etc/spegla/cluster-key/key")
        copy = page.replace(
            "connect();\n</script>", f"render({json.dumps(state.snapshot())});\n</script>"
        )
        copy = copy.replace('fetch(base + "stats")', "Promise.reject()")
        with tempfile.TemporaryDirectory(prefix="spg-chromium-") as tmp:
            Path(tmp, "page.html").write_text(copy)
            out = subprocess.run(
                [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp}/profile", "--dump-dom",
                 f"file://{tmp}/page.html"], capture_output=True, text=True, timeout=90,
            )  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        found = re.search(r'<p id="trust"([^>]*)>(.*?)</p>', out.stdout, re.S)
        assert found is not None
        shown[has_key] = found[1] + "|" + found[2]
    assert "hidden" not in shown[False] and "tags are never resolved through peers" in shown[False]
    assert 'data-cluster-key="false"' in shown[False]
    assert "hidden" in shown[True] and 'data-cluster-key="true"' in shown[True]


# --- two agents on loopback ------------------------------------------------------------------

TAG_PATH = "/v2/library/app/manifests/v1?ns=docker.io"


def tagged_backend(content_box: list[Content]) -> Callable[..., Any]:
    """A backend holding a small tagged image (docker.io/library/app:v1) and advertising it."""

    @asynccontextmanager
    async def factory(cfg: RegistryConfig, router: Router) -> AsyncIterator[Backend]:
        store = MemoryContentStore()
        content = fill(store)
        content_box.append(content)
        keys = [content.tag_key, content.index, content.manifest, content.layer, content.config]

        async def run_tracker(
            *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        ) -> None:
            await router.advertise(keys)
            task_status.started()
            await trio.sleep_forever()

        yield Backend(store=store, run_tracker=run_tracker)

    return factory


def empty_backend() -> Callable[..., Any]:
    @asynccontextmanager
    async def factory(cfg: RegistryConfig, router: Router) -> AsyncIterator[Backend]:
        async def run_tracker(
            *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        ) -> None:
            task_status.started()
            await trio.sleep_forever()

        yield Backend(store=MemoryContentStore(), run_tracker=run_tracker)

    return factory


async def until_ok(http: httpx.AsyncClient, url: str) -> httpx.Response:
    with trio.fail_after(10):
        while (answer := await http.get(url)).status_code != 200:  # noqa: ASYNC110
            await trio.sleep(0.05)  # the provider records may still be on their way
    return answer


@pytest.mark.parametrize("keyed", [True, False])
async def test_tags_through_peers_only_with_the_key(
    keyed: bool, tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    # the DHT itself needs the same key on both (or on neither): here A and B share it or lack it
    key_file = tmp_path / "keys" / "key"
    key_file.parent.mkdir()
    if keyed:
        key_file.write_bytes(KEY)
    caplog.set_level(logging.INFO)
    held: list[Content] = []
    cfg_a = config(str(tmp_path / "a"), cluster_key_file=str(key_file))
    peers = (HostPort("127.0.0.1", cfg_a.router_addr.port),)
    cfg_b = config(str(tmp_path / "b"), peers, cluster_key_file=str(key_file))
    stop = trio.Event()
    a: AgentHandle = await nursery.start(
        run_agent, cfg_a, stop, Hooks(backend=tagged_backend(held))
    )
    b: AgentHandle = await nursery.start(run_agent, cfg_b, stop, Hooks(backend=empty_backend()))
    assert a.node_id != b.node_id
    content = held[0]
    reg_b = f"http://127.0.0.1:{b.registry_port}"
    async with httpx.AsyncClient() as http:
        # digests come through the peer with or without the key (their bytes are verified)
        layer = await until_ok(http, f"{reg_b}/v2/library/app/blobs/{content.layer}?ns=docker.io")
        assert layer.content == content.layer_bytes
        # with the key the tag's record may still be on its way: wait for it; without, the
        # answer is at once (peers are not asked)
        tag = await (
            until_ok(http, f"{reg_b}{TAG_PATH}") if keyed else http.get(f"{reg_b}{TAG_PATH}")
        )
        stats = (await http.get(f"http://127.0.0.1:{b.metrics_port}/debug/web/stats")).json()
    stop.set()
    warnings = [r for r in caplog.records if "no cluster key" in r.getMessage()]
    if keyed:
        assert (tag.status_code, tag.headers["docker-content-digest"]) == (200, content.index)
        assert stats["trust"]["cluster_key"] is True and stats["trust"]["notice"] is None
        assert warnings == []
    else:
        assert tag.status_code == 404 and "without the cluster key" in tag.text
        assert stats["trust"]["tags_through_peers"] is False and stats["trust"]["notice"]
        assert len(warnings) == 2 and all(r.levelno == logging.WARNING for r in warnings)
