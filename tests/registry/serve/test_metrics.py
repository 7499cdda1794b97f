"""The HTTP metrics (Spegel names and labels) move with requests, on both servers."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from prometheus_client import REGISTRY

from registry.serve.server import ServerKind
from tests.fakes import MemoryContentStore
from tests.registry.conftest import SERVERS, StartNode, fill


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("registry_server", SERVERS)
async def test_request_metrics(
    start_node: StartNode, tmp_path: Path, registry_server: ServerKind
) -> None:
    store = MemoryContentStore()
    content = fill(store, files=tmp_path)
    node = await start_node(store)
    v2 = {"handler": "/v2/*"}
    before_blob = sample("http_request_duration_seconds_count", **v2, method="GET", code="200")
    before_size = sample("http_response_size_bytes_sum", **v2, method="GET", code="200")
    before_404 = sample("http_request_duration_seconds_count", **v2, method="HEAD", code="404")
    before_ready = sample(
        "http_request_duration_seconds_count", handler="/readyz", method="GET", code="200"
    )
    async with node.client() as http:
        assert (await http.get(f"/v2/library/app/blobs/{content.layer}?ns=docker.io")).is_success
        assert (await http.get("/v2/library/app/manifests/v1?ns=docker.io")).is_success
        assert (
            await http.head(f"/v2/x/blobs/{'sha256:' + '0' * 64}?ns=docker.io")
        ).status_code == 404
        assert (await http.get("/readyz")).is_success
    # one response of each path; only our server offers the zero-copy extension
    assert node.stats.served == (1 if registry_server == "h11" else 0)
    # the app records a request once its ASGI call has returned, just after the client got it
    for _ in range(500):  # at most 5 s: a hang guard
        settled = (
            not sample("http_requests_inflight", **v2)
            and sample(
                "http_request_duration_seconds_count", handler="/readyz", method="GET", code="200"
            )
            >= before_ready + 1
        )
        if settled:
            break
        await trio.sleep(0.01)
    assert (
        sample("http_request_duration_seconds_count", **v2, method="GET", code="200")
        == before_blob + 2
    )
    assert sample(
        "http_response_size_bytes_sum", **v2, method="GET", code="200"
    ) >= before_size + len(content.layer_bytes)
    assert (
        sample("http_request_duration_seconds_count", **v2, method="HEAD", code="404")
        == before_404 + 1
    )
    assert (
        sample("http_request_duration_seconds_count", handler="/readyz", method="GET", code="200")
        == before_ready + 1
    )
    assert sample("http_requests_inflight", **v2) == 0
    assert sample("spegel_mirror_requests_total", registry="docker.io", cache="miss") >= 1
