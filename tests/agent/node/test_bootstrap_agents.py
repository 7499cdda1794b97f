"""Two in-process agents join each other through the http and kubernetes bootstrap kinds (the latter
with the real kubernetes client, a kubeconfig file and the fake API server)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import trio

from agent.config import BootstrapConfig, ListenAddr, RegistryConfig
from agent.observability.metrics_server import serve_app
from agent.runtime.run import AgentHandle, Hooks, run_agent
from tests.agent.fake_k8s import FakeApiServer, LeaseStore
from tests.agent.runtime.test_run import config, memory_backend, mini_app

KUBECONFIG = """apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: http://127.0.0.1:{port}
users:
- name: tester
  user:
    token: test-token
contexts:
- name: fake
  context:
    cluster: fake
    user: tester
current-context: fake
"""


async def start_pair(
    nursery: trio.Nursery, cfg_a: RegistryConfig, cfg_b: RegistryConfig
) -> tuple[AgentHandle, AgentHandle, trio.Event]:
    stop = trio.Event()
    handles = []
    for cfg in (cfg_a, cfg_b):
        hooks = Hooks(backend=memory_backend([], []), app=mini_app)
        handles.append(
            await nursery.start(
                functools.partial(run_agent, cfg, stop, hooks, handle_signals=False)
            )
        )
    return handles[0], handles[1], stop


async def wait_ready(nursery: trio.Nursery, *handles: AgentHandle) -> None:
    import httpx

    async with httpx.AsyncClient() as http:
        with trio.fail_after(15):
            for handle in handles:
                url = f"http://127.0.0.1:{handle.registry_port}/readyz"
                while (await http.get(url)).status_code != 200:  # noqa: ASYNC110
                    await trio.sleep(0.05)


async def test_http_bootstrap_joins(tmp_path: Path, nursery: trio.Nursery) -> None:
    from tests.agent.runtime.test_run import free_port

    id_port = free_port()
    boot_a = BootstrapConfig(kind="http", http_addr=ListenAddr("127.0.0.1", id_port))
    boot_b = BootstrapConfig(kind="http", http_url=f"http://127.0.0.1:{id_port}/id")
    cfg_a = config(str(tmp_path / "a"))
    cfg_b = config(str(tmp_path / "b"))
    cfg_a = _with(cfg_a, bootstrap=boot_a)
    cfg_b = _with(cfg_b, bootstrap=boot_b)
    a, b, stop = await start_pair(nursery, cfg_a, cfg_b)
    await wait_ready(nursery, a, b)
    stop.set()


@pytest.mark.slow
async def test_kubernetes_bootstrap_joins(tmp_path: Path, nursery: trio.Nursery) -> None:
    store = LeaseStore()
    server = FakeApiServer(store)
    api_stop = trio.Event()
    port = await nursery.start(
        functools.partial(
            serve_app, server.app, ListenAddr("127.0.0.1", 0), shutdown_trigger=api_stop.wait
        )
    )
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG.format(port=port))
    boot = BootstrapConfig(kind="kubernetes", kubeconfig=str(kubeconfig), lease_namespace="ns1")
    cfg_a = _with(config(str(tmp_path / "a")), bootstrap=boot)
    cfg_b = _with(config(str(tmp_path / "b")), bootstrap=boot)
    a, b, stop = await start_pair(nursery, cfg_a, cfg_b)
    await wait_ready(nursery, a, b)
    lease = store.leases[("ns1", "spegla-leader-election")]
    holder = lease["spec"]["holderIdentity"]
    assert holder in (f"127.0.0.1:{a.router_port}", f"127.0.0.1:{b.router_port}")
    stop.set()
    api_stop.set()


def _with(cfg: RegistryConfig, **changes: object) -> RegistryConfig:
    import dataclasses

    return dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]
