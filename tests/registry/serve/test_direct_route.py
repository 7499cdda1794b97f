"""The app's direct route (`Registry.handle` called from its ASGI layer) answers exactly as
Quart's dispatch does: the same registry served both ways, the same raw requests, the same
status, headers and body; and a handler's exception gets Quart's 500 either way."""

from __future__ import annotations

import functools
from typing import Any

import h11
import pytest
import trio

from registry.serve.app import Registry, RegistrySettings, create_app
from registry.serve.server import serve_registry
from tests.fakes import MemoryContentStore, MemoryNetwork, MemoryRouter
from tests.registry.conftest import LOOPBACK, Content, fill
from tests.registry.serve.test_local_blobs import exchange

UNKNOWN = "sha256:" + "0" * 64


def targets(c: Content) -> list[str]:
    repo = "/v2/library/app"
    return [
        "/",
        "/v2",
        "/v2/",
        "/v2//",
        "/V2/",
        "/readyz",
        "/readyz/",
        "/livez",
        "/metrics",
        "/favicon.ico",
        f"{repo}/manifests/v1?ns=docker.io",
        f"{repo}/manifests/v1?ns=ghcr.io",
        f"{repo}/manifests/{c.manifest}?ns=docker.io",
        f"{repo}/manifests/{c.manifest}",
        f"{repo}/manifests/{c.manifest}/?ns=docker.io",
        f"{repo}/blobs/{c.layer}?ns=docker.io",
        f"{repo}/blobs/{c.layer}/?ns=docker.io",
        f"{repo}/blobs/{c.config}?ns=docker.io&ns=x",
        f"{repo}/blobs/{UNKNOWN}?ns=docker.io",
        f"{repo}/blobs/sha256:bad?ns=docker.io",
        f"/v2/library//app/blobs/{c.layer}?ns=docker.io",
        f"/v2/library/%61pp/blobs/{c.layer}?ns=docker%2Eio",
        f"/v2/../v2/library/app/blobs/{c.layer}?ns=docker.io",
        "/v2/library/app/tags/list?ns=docker.io",
        "/v2/_catalog",
    ]


REQUEST_HEADERS: list[tuple[tuple[str, str], ...]] = [
    (),
    (("Range", "bytes=1-10"),),
    (("Range", "bytes=99999999-"),),
    (("Range", "lines=1-2"),),
    (("X-Spegel-Mirrored", "true"),),
    (("Authorization", "Basic Zm9vOmJhcg=="),),
]
METHODS = ["GET", "HEAD", "POST", "DELETE", "OPTIONS", "PATCH", "FOO"]


async def serve(nursery: trio.Nursery, registry: Registry, fast: bool) -> int:
    port: int = await nursery.start(
        functools.partial(serve_registry, create_app(registry, fast=fast), LOOPBACK, 0)
    )
    return port


async def ask(port: int, requests: list[tuple[str, str, tuple[tuple[str, str], ...]]]) -> list[Any]:
    answers = []
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    conn = h11.Connection(h11.CLIENT)
    async with stream:
        for method, target, headers in requests:
            status, response_headers, body = await exchange(stream, conn, target, method, headers)
            response_headers.pop("date", None)
            answers.append((method, target, headers, status, response_headers, body))
    return answers


async def test_direct_route_answers_as_quart_does(nursery: trio.Nursery) -> None:
    store = MemoryContentStore()
    content = fill(store)
    registry = Registry(store, MemoryRouter(MemoryNetwork()), RegistrySettings())
    await nursery.start(registry.run)
    fast, quart = await serve(nursery, registry, True), await serve(nursery, registry, False)
    requests = [
        (method, target, headers)
        for target in targets(content)
        for method in METHODS
        for headers in REQUEST_HEADERS
    ]
    before = registry.stats.answered
    direct = await ask(fast, requests)
    assert registry.stats.answered - before == len(requests)
    dispatched = await ask(quart, requests)
    for one, other in zip(direct, dispatched, strict=True):
        assert one == other
    statuses = {answer[3] for answer in direct}
    assert {200, 206, 404, 416, 400} <= statuses  # the cases reach every kind of answer


@pytest.mark.parametrize("fast", [True, False])
async def test_handler_errors_get_quarts_500(
    nursery: trio.Nursery, fast: bool, caplog: pytest.LogCaptureFixture
) -> None:
    registry = Registry(MemoryContentStore(), MemoryRouter(MemoryNetwork()), RegistrySettings())

    async def exploding(scope: dict[str, Any], path: str) -> Any:
        raise RuntimeError("handler exploded")

    registry.handle = exploding  # type: ignore[method-assign]
    await nursery.start(registry.run)
    port = await serve(nursery, registry, fast)
    target = f"/v2/library/app/blobs/{UNKNOWN}?ns=docker.io"
    [(*_, status, headers, body)] = await ask(port, [("GET", target, ())])
    assert status == 500
    assert headers["content-type"].startswith("text/html")
    assert b"Internal Server Error" in body
    assert any("Exception on request GET" in r.getMessage() for r in caplog.records)
