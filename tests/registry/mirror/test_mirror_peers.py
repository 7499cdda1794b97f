"""The mirror path over real loopback sockets against good, failing, unreachable, silent, cut-off
and lying peers."""

from __future__ import annotations

import json

import httpx
import pytest

from registry.metrics import MIRROR_REQUESTS, PEER_QUARANTINED
from registry.mirror.job import MirrorSettings
from registry.oci.mediatypes import OCI_INDEX, OCI_MANIFEST, OCTET_STREAM
from registry.serve.app import RegistrySettings
from tests.fakes import MemoryContentStore, MemoryNetwork
from tests.registry.conftest import (
    Content,
    Node,
    ScriptedPeer,
    StartNode,
    StartScripted,
    fill,
    unreachable_peer,
    with_key,
)

# Real sockets run on the real clock: generous deadlines keep a busy CI machine from failing over
# by accident (the deadlines themselves are tested on a mock clock in test_mirror_core).
FAST = with_key(
    RegistrySettings(
        mirror=MirrorSettings(resolve_timeout=0.5, response_timeout=1.0, stall_timeout=1.0)
    )
)


def advertise(network: MemoryNetwork, key: str, *peers: object) -> None:
    for peer in peers:
        network.add(key, getattr(peer, "peer", peer))  # type: ignore[arg-type]


async def provider_and_client(
    start_node: StartNode, network: MemoryNetwork, settings: RegistrySettings = FAST
) -> tuple[Node, Content, Node]:
    """A provider node holding an image (advertised) and an empty client node."""
    provider_store = MemoryContentStore()
    content = fill(provider_store)
    provider = await start_node(provider_store, settings=with_key())
    for key in (content.config, content.layer, content.manifest, content.index, content.tag_key):
        network.add(key, provider.peer)
    client = await start_node(settings=settings)
    return provider, content, client


def counter(registry: str, cache: str) -> float:
    return MIRROR_REQUESTS.labels(registry, cache)._value.get()  # type: ignore[no-any-return]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_good_peer_serves_everything(
    method: str, start_node: StartNode, network: MemoryNetwork
) -> None:
    _, content, client = await provider_and_client(start_node, network)
    hits = counter("docker.io", "hit")
    async with client.client() as http:
        tag = await http.request(method, "/v2/library/app/manifests/v1?ns=docker.io")
        assert tag.status_code == 200
        assert tag.headers["docker-content-digest"] == content.index
        assert tag.headers["content-type"] == OCI_INDEX
        assert "oci-namespace" not in tag.headers
        manifest = await http.request(
            method, f"/v2/library/app/manifests/{content.manifest}?ns=docker.io"
        )
        assert manifest.status_code == 200
        assert manifest.headers["content-type"] == OCI_MANIFEST
        assert manifest.headers["content-length"] == str(len(content.manifest_bytes))
        blob = await http.request(method, f"/v2/library/app/blobs/{content.layer}?ns=docker.io")
        assert blob.status_code == 200
        assert blob.headers["accept-ranges"] == "bytes"
        assert blob.headers["content-length"] == str(len(content.layer_bytes))
        assert blob.headers["docker-content-digest"] == content.layer
        ranged = await http.request(
            method,
            f"/v2/library/app/blobs/{content.layer}?ns=docker.io",
            headers={"Range": "bytes=100-199"},
        )
        assert ranged.status_code == 206
        assert ranged.headers["content-type"] == OCTET_STREAM
        assert ranged.headers["content-range"] == f"bytes 100-199/{len(content.layer_bytes)}"
        bad_range = await http.request(
            method,
            f"/v2/library/app/blobs/{content.layer}?ns=docker.io",
            headers={"Range": f"bytes={len(content.layer_bytes)}-"},
        )
        assert bad_range.status_code == 416
        if method == "GET":
            assert manifest.content == content.manifest_bytes
            assert blob.content == content.layer_bytes
            assert ranged.content == content.layer_bytes[100:200]
        else:
            assert blob.content == manifest.content == b""
    assert counter("docker.io", "hit") == hits + 4  # the 416 is not a hit


async def test_blob_as_manifest_is_not_served_through_peers(
    start_node: StartNode, network: MemoryNetwork
) -> None:
    _, content, client = await provider_and_client(start_node, network)
    async with client.client() as http:
        response = await http.get(f"/v2/library/app/manifests/{content.layer}?ns=docker.io")
        assert response.status_code == 404
        assert json.loads(response.content)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        response = await http.get(f"/v2/library/app/blobs/{content.manifest}?ns=docker.io")
        assert response.status_code == 404


async def test_fail_over_past_500_unreachable_and_silent(
    start_node: StartNode, network: MemoryNetwork, start_scripted: StartScripted
) -> None:
    settings = RegistrySettings(
        mirror=MirrorSettings(resolve_timeout=0.5, response_timeout=1.0, resolve_retries=4)
    )
    provider, content, client = await provider_and_client(start_node, network, settings)
    failing = await start_scripted(ScriptedPeer("500"))
    silent = await start_scripted(ScriptedPeer("silent"))
    network.remove(content.layer, provider.peer)
    advertise(network, content.layer, failing, unreachable_peer(), silent, provider)
    async with client.client() as http:
        response = await http.get(f"/v2/library/app/blobs/{content.layer}?ns=docker.io")
    assert response.status_code == 200
    assert response.content == content.layer_bytes
    assert len(failing.requests) == len(silent.requests) == 1
    method, target, headers = failing.requests[0]
    assert (method, target) == ("GET", f"/v2/library/app/blobs/{content.layer}?ns=docker.io")
    assert headers["x-spegel-mirrored"] == "true"


async def test_all_peers_failing_gives_404_with_attempts(
    start_node: StartNode, network: MemoryNetwork, start_scripted: StartScripted
) -> None:
    client = await start_node(settings=FAST)
    key = "sha256:" + "1" * 64
    peers = [await start_scripted(ScriptedPeer("500")) for _ in range(4)]
    advertise(network, key, *peers)
    misses = counter("docker.io", "miss")
    async with client.client() as http:
        response = await http.get(f"/v2/x/blobs/{key}?ns=docker.io")
    assert response.status_code == 404
    error = json.loads(response.content)["errors"][0]
    assert error == {
        "code": "BLOB_UNKNOWN",
        "message": f"all request retries exhausted for {key}",
        "detail": {"attempts": 3},
    }
    assert sum(len(p.requests) for p in peers) == 3
    assert counter("docker.io", "miss") == misses + 1


async def test_peers_run_out_before_attempts(
    start_node: StartNode, network: MemoryNetwork, start_scripted: StartScripted
) -> None:
    client = await start_node(settings=FAST)
    key = "docker.io/x:v1"
    advertise(network, key, await start_scripted(ScriptedPeer("500")))
    async with client.client() as http:
        response = await http.head("/v2/x/manifests/v1?ns=docker.io")
        assert response.status_code == 404
        response = await http.get("/v2/x/manifests/v1?ns=docker.io")
    error = json.loads(response.content)["errors"][0]
    assert error["message"] == f"all request retries exhausted for {key}"
    assert error["detail"] == {"attempts": 1}


async def test_mirrored_requests_are_never_forwarded(
    start_node: StartNode, network: MemoryNetwork
) -> None:
    _, content, client = await provider_and_client(start_node, network)
    async with client.client() as http:
        response = await http.get(
            f"/v2/library/app/blobs/{content.layer}?ns=docker.io",
            headers={"X-Spegel-Mirrored": "true"},
        )
    assert response.status_code == 404
    assert client.router.resolved == []


@pytest.mark.parametrize("client_range", [None, "bytes=10-", "bytes=300000-300009"])
async def test_blob_cut_off_midway_resumes_from_another_peer(
    client_range: str | None,
    start_node: StartNode,
    network: MemoryNetwork,
    start_scripted: StartScripted,
) -> None:
    provider, content, client = await provider_and_client(start_node, network)
    data = content.layer_bytes
    cut = await start_scripted(ScriptedPeer("cut", data, content.layer, cut=400_000))
    cut2 = await start_scripted(ScriptedPeer("cut", data, content.layer, cut=700_000))
    network.remove(content.layer, provider.peer)
    advertise(network, content.layer, cut, provider)
    headers = {"Range": client_range} if client_range else {}
    async with client.client() as http:
        response = await http.get(
            f"/v2/library/app/blobs/{content.layer}?ns=docker.io", headers=headers
        )
        expected = data if client_range is None else None
        if client_range == "bytes=10-":
            expected = data[10:]
        if client_range == "bytes=300000-300009":
            expected = data[300000:300010]
        assert response.status_code == (200 if client_range is None else 206)
        assert response.content == expected
        # a second cut in the chain: cut at 400 kB, cut again at 700 kB, then the full peer
        network.remove(content.layer, provider.peer)
        network.remove(content.layer, cut.peer)
        advertise(network, content.layer, cut, cut2, provider)
        again = await http.get(f"/v2/library/app/blobs/{content.layer}?ns=docker.io")
    assert again.content == data
    assert cut2.requests[-1][2]["range"] == f"bytes=400000-{len(data) - 1}"


async def test_lying_peer_manifest_is_never_passed_on(
    start_node: StartNode, network: MemoryNetwork, start_scripted: StartScripted
) -> None:
    provider, content, client = await provider_and_client(start_node, network)
    forged = content.manifest_bytes.replace(b"schemaVersion", b"schemaVersioN")
    liar = await start_scripted(ScriptedPeer("serve", forged, content.manifest, OCI_MANIFEST))
    network.remove(content.manifest, provider.peer)
    advertise(network, content.manifest, liar, provider)
    quarantined = PEER_QUARANTINED.labels("docker.io")._value.get()
    async with client.client() as http:
        response = await http.get(f"/v2/library/app/manifests/{content.manifest}?ns=docker.io")
        assert response.status_code == 200
        assert response.content == content.manifest_bytes
        assert len(liar.requests) == 1
        assert PEER_QUARANTINED.labels("docker.io")._value.get() == quarantined + 1
        # later requests avoid the liar for that digest
        again = await http.get(f"/v2/library/app/manifests/{content.manifest}?ns=docker.io")
        assert again.content == content.manifest_bytes
        assert len(liar.requests) == 1


async def test_lying_peer_big_blob_aborts_before_last_byte(
    start_node: StartNode,
    network: MemoryNetwork,
    start_scripted: StartScripted,
    caplog: pytest.LogCaptureFixture,
) -> None:
    streaming = RegistrySettings(
        mirror=MirrorSettings(resolve_timeout=0.5, response_timeout=1.0, verify_first_max=0)
    )
    provider, content, client = await provider_and_client(start_node, network, streaming)
    forged = bytearray(content.layer_bytes)
    forged[500_000] ^= 0xFF
    liar = await start_scripted(ScriptedPeer("serve", bytes(forged), content.layer))
    network.remove(content.layer, provider.peer)
    advertise(network, content.layer, liar)
    received = bytearray()
    async with client.client() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            async with http.stream(
                "GET", f"/v2/library/app/blobs/{content.layer}?ns=docker.io"
            ) as response:
                assert response.status_code == 200
                async for chunk in response.aiter_raw():
                    received += chunk
        assert len(received) < len(content.layer_bytes)
        # quarantined: the next request skips the liar and uses the honest provider
        advertise(network, content.layer, provider)
        again = await http.get(f"/v2/library/app/blobs/{content.layer}?ns=docker.io")
    assert again.content == content.layer_bytes
    assert len(liar.requests) == 1
    assert "quarantined" in caplog.text
    assert "Error in ASGI Framework" not in caplog.text  # the abort is not a crash


@pytest.mark.parametrize("honest_too", [True, False])
async def test_lying_peer_small_blob_costs_a_fail_over_not_a_bad_download(
    honest_too: bool,
    start_node: StartNode,
    network: MemoryNetwork,
    start_scripted: StartScripted,
) -> None:
    provider, content, client = await provider_and_client(start_node, network)
    forged = bytearray(content.layer_bytes)
    forged[-1] ^= 0xFF
    liar = await start_scripted(ScriptedPeer("serve", bytes(forged), content.layer))
    network.remove(content.layer, provider.peer)
    advertise(network, content.layer, liar, *([provider] if honest_too else []))
    async with client.client() as http:
        response = await http.get(f"/v2/library/app/blobs/{content.layer}?ns=docker.io")
    if honest_too:
        assert (response.status_code, response.content) == (200, content.layer_bytes)
    else:  # a clean miss: the client (containerd) goes upstream with nothing bad in hand
        assert response.status_code == 404
        assert json.loads(response.content)["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert len(liar.requests) == 1


async def test_peer_with_wrong_digest_header_is_skipped(
    start_node: StartNode, network: MemoryNetwork, start_scripted: StartScripted
) -> None:
    provider, content, client = await provider_and_client(start_node, network)
    wrong = await start_scripted(ScriptedPeer("serve", content.layer_bytes, "sha256:" + "9" * 64))
    network.remove(content.layer, provider.peer)
    advertise(network, content.layer, wrong, provider)
    async with client.client() as http:
        response = await http.get(f"/v2/library/app/blobs/{content.layer}?ns=docker.io")
    assert response.content == content.layer_bytes
    assert len(wrong.requests) == 1


async def test_peer_answering_404_is_skipped_for_that_key_afterwards(
    start_node: StartNode, network: MemoryNetwork, start_scripted: StartScripted
) -> None:
    provider, content, client = await provider_and_client(start_node, network)
    stale = await start_scripted(ScriptedPeer("404"))  # deleted the content, record still alive
    network.remove(content.layer, provider.peer)
    advertise(network, content.layer, stale, provider)
    advertise(network, content.config, stale)  # before provider in the lookup order
    network.remove(content.config, provider.peer)
    advertise(network, content.config, provider)
    async with client.client() as http:
        for _ in range(3):
            response = await http.get(f"/v2/library/app/blobs/{content.layer}?ns=docker.io")
            assert (response.status_code, response.content) == (200, content.layer_bytes)
        assert len(stale.requests) == 1  # tried once, then skipped for this key
        # only for that key: another key it advertises is still asked for
        response = await http.get(f"/v2/library/app/blobs/{content.config}?ns=docker.io")
        assert response.status_code == 200
    assert len(stale.requests) == 2
