"""In-process wiring of `spegla registry`: two agents with the real DHT on loopback, in-memory
content and a fake state tracker; readiness, metrics, debug endpoints, websocket, graceful drain,
crash exit."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
import trio_websocket
from quart import Response
from quart_trio import QuartTrio

from agent.config import BootstrapConfig, HostPort, ListenAddr, RegistryConfig
from agent.runtime.run import AgentHandle, Hooks, run_agent
from agent.runtime.supervise import ServiceFailed
from agent.runtime.wiring import AppParts, Backend
from registry.interfaces import Router
from tests.fakes import MemoryContentStore, sha256_digest


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def config(tmp: str, peers: tuple[HostPort, ...] = (), **kw: Any) -> RegistryConfig:
    return RegistryConfig(
        registry_addr=ListenAddr("127.0.0.1", free_port()),
        router_addr=ListenAddr("127.0.0.1", free_port(socket.SOCK_DGRAM)),
        metrics_addr=ListenAddr("127.0.0.1", 0),
        bootstrap=BootstrapConfig(kind="static", static_peers=peers)
        if peers
        else BootstrapConfig(),
        data_dir=tmp,
        advertise_addr="127.0.0.1",
        shutdown_grace=2.0,
        **kw,
    )


BLOB = b"hello from node a"


def memory_backend(
    keys: list[str], images: list[str], blob: bytes | None = None
) -> Callable[..., Any]:
    @asynccontextmanager
    async def factory(cfg: RegistryConfig, router: Router) -> AsyncIterator[Backend]:
        store = MemoryContentStore()
        if blob is not None:
            store.add(blob)

        async def run_tracker(
            *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        ) -> None:
            await router.advertise(keys)
            task_status.started()
            await trio.sleep_forever()

        yield Backend(store=store, run_tracker=run_tracker, images=lambda: list(images))

    return factory


def mini_app(parts: AppParts) -> Any:
    """Stands in for the registry app: /readyz and a slow route to watch draining."""
    app = QuartTrio("mini-registry")
    ready = parts.ready

    @app.route("/readyz")
    async def readyz() -> Response:
        return Response("ok" if ready() else "not ready", status=200 if ready() else 503)

    @app.route("/slow")
    async def slow() -> Response:
        await trio.sleep(0.5)
        return Response("done")

    return app


async def test_two_agents_join_serve_debug_and_drain(tmp_path: Any, nursery: trio.Nursery) -> None:
    key = sha256_digest(BLOB)
    cfg_a = config(str(tmp_path / "a"))
    cfg_b = config(str(tmp_path / "b"), peers=(HostPort("127.0.0.1", cfg_a.router_addr.port),))
    stop_a, stop_b = trio.Event(), trio.Event()
    hooks_a = Hooks(backend=memory_backend([key], ["example.com/app:v1"], BLOB))
    hooks_b = Hooks(backend=memory_backend([], []))
    done: list[str] = []

    async def agent(
        cfg: RegistryConfig,
        stop: trio.Event,
        hooks: Hooks,
        name: str,
        *,
        task_status: trio.TaskStatus[AgentHandle],
    ) -> None:
        await run_agent(cfg, stop, hooks, handle_signals=False, task_status=task_status)
        done.append(name)

    a = await nursery.start(agent, cfg_a, stop_a, hooks_a, "a")
    b = await nursery.start(agent, cfg_b, stop_b, hooks_b, "b")
    assert (tmp_path / "a" / "node-id").read_text().strip() == a.node_id.hex()

    async with httpx.AsyncClient() as http:
        reg_b = f"http://127.0.0.1:{b.registry_port}"
        with trio.fail_after(10):
            while (await http.get(f"{reg_b}/readyz")).status_code != 200:  # noqa: ASYNC110
                await trio.sleep(0.05)
        reg_a = f"http://127.0.0.1:{a.registry_port}"
        with trio.fail_after(10):
            while (await http.get(f"{reg_a}/readyz")).status_code != 200:  # noqa: ASYNC110
                await trio.sleep(0.05)

        metrics = f"http://127.0.0.1:{b.metrics_port}"
        text = (await http.get(f"{metrics}/metrics")).text
        assert "process_resident_memory_bytes" in text or "python_info" in text
        tasks = (await http.get(f"{metrics}/debug/tasks")).text
        assert "- <init>" in tasks and "dht" in tasks and "registry" in tasks
        tree = (await http.get(f"{metrics}/debug/tasks", params={"format": "json"})).json()
        assert tree["tasks"] > 10 and tree["root"]["name"] == "<init>"
        page = await http.get(f"{metrics}/debug/web")
        assert page.status_code == 200 and "new WebSocket(" in page.text
        stats = (await http.get(f"http://127.0.0.1:{a.metrics_port}/debug/web/stats")).json()
        assert stats["node_id"] == a.node_id.hex() and stats["images"] == [
            {"name": "example.com/app:v1"}
        ]
        assert stats["services"]["dht"] == "running" and stats["ready"] is True
        assert stats["stats"]["dht"]["table_size"] >= 1
        assert any(p.get("port") == cfg_b.router_addr.port for p in stats["peers"])

        # Live page over the websocket: a snapshot first, then mirror results as they happen.
        url = f"ws://127.0.0.1:{b.metrics_port}/debug/web/ws"
        async with trio_websocket.open_websocket_url(url) as ws:
            first = json.loads(await ws.get_message())
            assert first["type"] == "snapshot"
            # A pull through B: B finds A in the DHT and streams the blob from A's registry.
            blob_url = f"{reg_b}/v2/app/blobs/{key}?ns=example.com"
            with trio.fail_after(10):
                while (answer := await http.get(blob_url)).status_code != 200:  # noqa: ASYNC110
                    await trio.sleep(0.1)  # A's provider record may still be on its way
            assert answer.content == BLOB
            missing = "sha256:" + "0" * 64
            assert (
                await http.get(f"{reg_b}/v2/app/blobs/{missing}?ns=example.com")
            ).status_code == 404
            with trio.fail_after(5):
                while True:
                    event = json.loads(await ws.get_message())
                    if event["type"] == "mirror" and event["result"]["outcome"] == "hit":
                        break
            assert event["result"]["key"] == key  # one page entry per mirror request
        metrics_text = (await http.get(f"{metrics}/metrics")).text
        # every registry is mirrored here (no --mirrored-registries): a registry outside the
        # well-known public ones is counted as "other" (label values from a fixed set)
        assert 'spegel_mirror_requests_total{cache="hit",registry="other"}' in metrics_text
        stats_b = (await http.get(f"{metrics}/debug/web/stats")).json()
        assert stats_b["last_success"] is not None

        stop_b.set()
        with trio.fail_after(5):
            while "b" not in done:  # noqa: ASYNC110
                await trio.sleep(0.02)
        with pytest.raises(httpx.ConnectError):
            await http.get(f"{reg_b}/readyz")
    stop_a.set()


async def test_sigterm_drains_in_flight_requests(tmp_path: Any) -> None:
    """A real SIGTERM to this process (the agent's signal receiver is installed before it reports
    started): the slow request in flight still completes, then run_agent returns."""
    cfg = config(str(tmp_path), standalone=True)
    stop = trio.Event()
    results: list[int] = []
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(
            functools.partial(
                run_agent,
                cfg,
                stop,
                Hooks(backend=memory_backend([], []), app=mini_app),
                handle_signals=True,
            )
        )
        async with httpx.AsyncClient() as http:

            async def slow() -> None:
                results.append(
                    (await http.get(f"http://127.0.0.1:{handle.registry_port}/slow")).status_code
                )

            async with trio.open_nursery() as inner:
                inner.start_soon(slow)
                await trio.sleep(0.2)
                os.kill(os.getpid(), signal.SIGTERM)
    assert results == [200] and stop.is_set()


async def test_node_id_survives_restart(tmp_path: Any) -> None:
    ids = []
    for _ in range(2):
        stop = trio.Event()
        cfg = config(str(tmp_path), standalone=True)
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(
                functools.partial(
                    run_agent,
                    cfg,
                    stop,
                    Hooks(backend=memory_backend([], []), app=mini_app),
                    handle_signals=False,
                )
            )
            ids.append(handle.node_id)
            stop.set()
    assert ids[0] == ids[1]


async def test_crashing_service_takes_the_agent_down(tmp_path: Any, autojump_clock: Any) -> None:
    @asynccontextmanager
    async def broken_backend(cfg: RegistryConfig, router: Router) -> AsyncIterator[Backend]:
        async def run_tracker(
            *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        ) -> None:
            raise OSError("containerd socket vanished")

        yield Backend(store=MemoryContentStore(), run_tracker=run_tracker)

    cfg = config(str(tmp_path), standalone=True)
    with pytest.RaisesGroup(ServiceFailed, flatten_subgroups=True):
        await run_agent(
            cfg, trio.Event(), Hooks(backend=broken_backend, app=mini_app), handle_signals=False
        )


def test_make_bootstrapper_and_psk(tmp_path: Any) -> None:
    from agent.config import ConfigError
    from agent.node.bootstrap import (
        DnsBootstrap,
        HttpBootstrap,
        NoBootstrap,
        SelfInfo,
        StaticBootstrap,
    )
    from agent.node.setup import make_bootstrapper, read_psk

    me = SelfInfo(bytes(32), "10.0.0.1", 5001)
    base = RegistryConfig()
    kinds = {
        "none": NoBootstrap,
        "static": StaticBootstrap,
        "dns": DnsBootstrap,
        "http": HttpBootstrap,
    }
    for kind, cls in kinds.items():
        boot = BootstrapConfig(
            kind=kind,
            dns_domain="x",
            http_url="http://10.0.0.2/id",
            static_peers=(HostPort("10.0.0.2", 5001),),
        )
        cfg = RegistryConfig(bootstrap=boot)
        assert isinstance(make_bootstrapper(cfg, me), cls)
    with pytest.raises(ConfigError, match="advertise"):
        make_bootstrapper(
            RegistryConfig(bootstrap=BootstrapConfig(kind="kubernetes")),
            SelfInfo(bytes(32), "", 5001),
        )
    assert base.bootstrap.kind == "none"
    assert read_psk("") is None
    key = tmp_path / "psk"
    key.write_bytes(b"0123456789abcdef0123\n")
    assert read_psk(str(key)) == b"0123456789abcdef0123"
    key.write_bytes(b"short")
    with pytest.raises(ConfigError, match="16 bytes"):
        read_psk(str(key))
    # a missing file in an existing directory: the optional Secret is not there, so no key
    assert read_psk(str(tmp_path / "missing")) is None
    with pytest.raises(ConfigError, match="no such file or directory"):
        read_psk(str(tmp_path / "no-dir" / "key"))


def test_unreadable_psk_file_is_a_one_line_usage_error(tmp_path: Any) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "registry",
            "--dht-psk-file",
            str(tmp_path / "none" / "key"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        line for line in out.stderr.strip().splitlines() if "--cluster-key-file" in line
    ]
    assert len(out.stderr.strip().splitlines()) == 1


def test_main_exits_1_when_a_service_keeps_crashing(tmp_path: Any) -> None:
    from agent.runtime.run import main
    from agent.runtime.supervise import RestartPolicy

    starts = 0

    @asynccontextmanager
    async def broken_backend(cfg: RegistryConfig, router: Router) -> AsyncIterator[Backend]:
        async def run_tracker(
            *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        ) -> None:
            nonlocal starts
            starts += 1
            raise OSError("containerd socket vanished")

        yield Backend(store=MemoryContentStore(), run_tracker=run_tracker)

    fast = RestartPolicy(initial_backoff=0.01, max_backoff=0.05, max_restarts=3, window=60)
    hooks = Hooks(backend=broken_backend, app=mini_app, policy=fast)
    assert main(config(str(tmp_path), standalone=True), hooks) == 1
    assert starts == 4


async def test_static_bootstrap_from_a_spegel_multiaddr(
    tmp_path: Any, nursery: trio.Nursery
) -> None:
    """A node configured with Spegel's multiaddr form (`/ip4/.../tcp/<port>/p2p/<id>`) joins the
    node at that address over the real DHT and becomes ready."""
    from agent.cli.main import build_parser, registry_config

    cfg_a = config(str(tmp_path / "a"))
    multiaddr = f"/ip4/127.0.0.1/tcp/{cfg_a.router_addr.port}/p2p/12D3KooWQmDoesNotMatter"
    parsed = registry_config(
        build_parser({}).parse_args(
            ["registry", "--bootstrap-kind=static", "--static-bootstrap-peers", multiaddr]
        )
    )
    cfg_b = config(str(tmp_path / "b"), peers=parsed.bootstrap.static_peers)
    stop = trio.Event()
    await nursery.start(
        functools.partial(
            run_agent, cfg_a, stop, Hooks(backend=memory_backend([], [])), handle_signals=False
        )
    )
    b = await nursery.start(
        functools.partial(
            run_agent, cfg_b, stop, Hooks(backend=memory_backend([], [])), handle_signals=False
        )
    )
    async with httpx.AsyncClient() as http:
        with trio.fail_after(10):
            while (  # noqa: ASYNC110
                await http.get(f"http://127.0.0.1:{b.registry_port}/readyz")
            ).status_code != 200:
                await trio.sleep(0.05)
    stop.set()


async def test_agent_requires_basic_auth_from_the_secret_directory(tmp_path: Any) -> None:
    """`--basic-auth-dir` holding a username and a password: the agent's registry answers 401
    without them and serves with them; the probes stay open."""
    secret = tmp_path / "basic-auth"
    secret.mkdir()
    (secret / "username").write_text("node")
    (secret / "password").write_text("pw\n")
    cfg = config(str(tmp_path / "data"), standalone=True, basic_auth_dir=str(secret))
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(
            functools.partial(
                run_agent,
                cfg,
                stop,
                Hooks(backend=memory_backend([], [], BLOB)),
                handle_signals=False,
            )
        )
        base = f"http://127.0.0.1:{handle.registry_port}"
        blob = f"{base}/v2/app/blobs/{sha256_digest(BLOB)}?ns=example.com"
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{base}/livez")).status_code == 200
            refused = await http.get(blob)
            assert refused.status_code == 401
            assert refused.json()["errors"][0]["code"] == "UNAUTHORIZED"
            assert (await http.get(blob, auth=("node", "wrong"))).status_code == 401
            served = await http.get(blob, auth=("node", "pw"))
            assert (served.status_code, served.content) == (200, BLOB)
        stop.set()
