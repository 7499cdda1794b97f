"""Trust between agents (issue 17, items 2 and 5): the cluster key's peer credentials and answer
proofs (pure), the address policy (pure, and at the point of use with a client that records and
never dials), and the registry over real loopback sockets: tags resolve only between key holders,
credentials replace the Basic password, and a node without the key still mirrors digests."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from registry.auth.basic import BasicAuth
from registry.auth.peer import (
    ANSWER_HEADER,
    SCHEME,
    PeerAuth,
    admit,
    hkdf_sha256,
    parse_credential,
)
from registry.burst.attempts import MirrorAttempts
from registry.burst.peer_addresses import allowed_hosts, peer_address_allowed
from registry.http.client import PeerError
from registry.interfaces import Peer
from registry.mirror.forwarder import Forwarder
from registry.mirror.job import MirrorFailure, MirrorJob, MirrorSettings
from registry.mirror.peer_answer import PeerAnswerError, check_peer_answer
from registry.mirror.peer_transfer import TransferRequest, open_transfer
from registry.oci.distribution import ContentRequest, parse_request_path
from registry.serve.app import RegistrySettings
from tests.fakes import MemoryContentStore, MemoryNetwork, MemoryRouter
from tests.registry.conftest import (
    CLUSTER_KEY,
    SERVERS,
    ScriptedPeer,
    StartNode,
    StartScripted,
    fill,
    with_key,
)
from tests.registry.mirror.test_mirror_peers import FAST

DIGEST = "sha256:" + "a" * 64
OTHER = "sha256:" + "b" * 64
TAG = "/v2/library/app/manifests/v1"
NOW = 1_800_000_000.0


# --- credentials and proofs (pure) ----------------------------------------------------------


def test_hkdf_matches_rfc5869_test_case_3() -> None:
    # RFC 5869 A.3: SHA-256, empty salt and info
    ikm = bytes.fromhex("0b" * 22)
    okm = hkdf_sha256(ikm, b"", 42)
    assert okm.hex() == (
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    )


def test_a_credential_is_valid_once_for_exactly_its_request() -> None:
    auth = PeerAuth(CLUSTER_KEY)
    header, nonce = auth.sign("GET", TAG, "docker.io", NOW)
    assert header.startswith(SCHEME + " ") and nonce in header
    credential = parse_credential(header)
    assert credential is not None and credential.nonce == nonce
    verifier = PeerAuth(CLUSTER_KEY)  # another agent holding the same key
    # another method, path or ns does not verify (the MAC covers them)
    assert verifier.check(header, "HEAD", TAG, "docker.io", NOW, consume=False) is None
    assert verifier.check(header, "GET", TAG + "x", "docker.io", NOW, consume=False) is None
    assert verifier.check(header, "GET", TAG, "ghcr.io", NOW, consume=False) is None
    # looking does not spend it; answering does; then it is a replay
    assert verifier.check(header, "GET", TAG, "docker.io", NOW, consume=False) is not None
    assert verifier.check(header, "GET", TAG, "docker.io", NOW + 1, consume=True) is not None
    assert verifier.check(header, "GET", TAG, "docker.io", NOW + 2, consume=True) is None
    assert verifier.check(header, "GET", TAG, "docker.io", NOW + 2, consume=False) is None


def test_a_credential_is_refused_outside_the_window_or_with_another_key() -> None:
    auth = PeerAuth(CLUSTER_KEY, window=30.0)
    header, _ = auth.sign("GET", TAG, "docker.io", NOW)
    assert auth.check(header, "GET", TAG, "docker.io", NOW + 31, consume=False) is None
    assert auth.check(header, "GET", TAG, "docker.io", NOW - 31, consume=False) is None
    assert auth.check(header, "GET", TAG, "docker.io", NOW + 29, consume=False) is not None
    rogue = PeerAuth(b"another cluster's key, 32 bytes")
    forged, _ = rogue.sign("GET", TAG, "docker.io", NOW)
    assert auth.check(forged, "GET", TAG, "docker.io", NOW, consume=True) is None


def test_the_nonce_memory_is_bounded() -> None:
    auth = PeerAuth(CLUSTER_KEY, max_nonces=8)
    for i in range(100):
        header, _ = auth.sign("GET", TAG, "docker.io", NOW)
        assert auth.check(header, "GET", TAG, "docker.io", NOW + i * 0.01, consume=True)
    assert len(auth._seen) <= 8


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Basic c3BlZ2xhOnB3",
        "Spegla-Peer",
        "spegla-peer t=1,n=AAAAAAAAAAAAAAAAAAAAAA,m=" + "A" * 43,  # the scheme is exact
        "Spegla-Peer t=1,n=AAAAAAAAAAAAAAAAAAAAAA",
        "Spegla-Peer t=1,n=AAAAAAAAAAAAAAAAAAAAAA,m=" + "A" * 42,
        "Spegla-Peer t=-1,n=AAAAAAAAAAAAAAAAAAAAAA,m=" + "A" * 43,
        "Spegla-Peer t=\u0661,n=AAAAAAAAAAAAAAAAAAAAAA,m=" + "A" * 43,  # non-ASCII digit
        "Spegla-Peer t=1,t=2,n=AAAAAAAAAAAAAAAAAAAAAA,m=" + "A" * 43,
        "Spegla-Peer t=1,n=AAAA!AAAAAAAAAAAAAAAAA,m=" + "A" * 43,
        "Spegla-Peer t=1,n=AAAAAAAAAAAAAAAAAAAAAA,m=" + "A" * 43 + ",x=1",
        "Spegla-Peer " + "t=1," * 200,
    ],
)
def test_malformed_credentials_are_refused(header: str | None) -> None:
    auth = PeerAuth(CLUSTER_KEY)
    assert parse_credential(header) is None
    assert auth.check(header, "GET", TAG, "docker.io", 1.0, consume=True) is None


def test_an_answer_proof_binds_nonce_digest_and_reference() -> None:
    auth, other = PeerAuth(CLUSTER_KEY), PeerAuth(CLUSTER_KEY)
    ref = "docker.io/library/app:v1"
    proof = auth.answer_proof("nonce-1", DIGEST, ref)
    assert other.answer_ok("nonce-1", DIGEST, ref, proof)
    assert not other.answer_ok("nonce-2", DIGEST, ref, proof)  # an old answer replayed
    assert not other.answer_ok("nonce-1", OTHER, ref, proof)  # another image
    assert not other.answer_ok("nonce-1", DIGEST, "docker.io/library/app:v2", proof)
    assert not other.answer_ok("nonce-1", DIGEST, ref, None)
    assert not other.answer_ok("nonce-1", DIGEST, ref, "x" * 10_000)
    rogue = PeerAuth(b"another cluster's key, 32 bytes")
    assert not other.answer_ok("nonce-1", DIGEST, ref, rogue.answer_proof("nonce-1", DIGEST, ref))


def test_admit_takes_basic_credentials_or_a_peer_credential() -> None:
    basic = BasicAuth("spegla", "s3cret")
    auth = PeerAuth(CLUSTER_KEY)
    header, nonce = auth.sign("GET", TAG, "docker.io", NOW)
    args = ("GET", TAG, "docker.io", NOW)
    ok, credential = admit(basic, auth, header, *args)
    assert ok and credential is not None and credential.nonce == nonce
    assert admit(basic, auth, basic.header_value, *args) == (True, None)
    assert admit(basic, auth, None, *args) == (False, None)
    assert admit(basic, None, header, *args) == (False, None)  # no key here: not a credential
    assert admit(None, None, None, *args) == (True, None)  # nothing configured: open
    assert admit(basic, auth, header, *args, consume=True)[0]
    assert admit(basic, auth, header, *args) == (False, None)  # spent


def test_a_short_key_is_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        PeerAuth(b"too short")


def tag_answer(vouch: Any) -> Any:
    return check_peer_answer(
        status=200,
        headers={
            "docker-content-digest": DIGEST,
            "content-type": "application/vnd.oci.image.index.v1+json",
            "content-length": "10",
        },
        expected_digest=None,
        is_blob=False,
        is_head=True,
        requested=None,
        vouch=vouch,
    )


def test_a_tag_answer_is_used_only_when_vouched_for() -> None:
    asked: list[str] = []
    assert tag_answer(lambda d: asked.append(d) or True).digest == DIGEST
    assert asked == [DIGEST]
    with pytest.raises(PeerAnswerError, match="not vouched"):
        tag_answer(lambda d: False)
    with pytest.raises(PeerAnswerError, match="not vouched"):
        tag_answer(None)


# --- where requests go (pure, then at the point of use) -------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "169.254.169.254",  # cloud metadata
        "169.254.0.1",
        "fe80::1",
        "fe80::1%eth0",
        "fd00:ec2::254",
        "100.100.100.200",
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "ff02::1",
        "255.255.255.255",
        "127.0.0.1",
        "127.8.9.10",
        "::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "localhost",
        "metadata.google.internal",
        "",
    ],
)
def test_addresses_that_are_never_peers(host: str) -> None:
    assert not peer_address_allowed(host)


@pytest.mark.parametrize(
    "host", ["10.213.0.2", "172.16.5.4", "192.168.1.9", "fd12::5", "2001:db8::7"]
)
def test_cluster_addresses_are_peers(host: str) -> None:
    assert peer_address_allowed(host)


def test_loopback_only_when_this_node_is_on_loopback() -> None:
    assert peer_address_allowed("127.0.0.1", allow_loopback=True)
    assert peer_address_allowed("::1", allow_loopback=True)
    assert not peer_address_allowed("169.254.169.254", allow_loopback=True)
    peer = Peer(b"\x01" * 32, "169.254.169.254", 5000, more_hosts=("fe80::1", "10.1.2.3", "::1"))
    assert allowed_hosts(peer) == ("10.1.2.3",)
    assert allowed_hosts(peer, allow_loopback=True) == ("10.1.2.3", "::1")


@dataclass
class RecordingClient:
    """A peer client that records what it was asked to dial and dials nothing."""

    dialled: list[tuple[str, int, tuple[str, ...], dict[str, str]]] = field(default_factory=list)

    @asynccontextmanager
    async def request(
        self,
        host: str,
        port: int,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        *,
        also: tuple[str, ...] = (),
    ) -> AsyncIterator[Any]:
        self.dialled.append((host, port, tuple(also), dict(headers)))
        raise PeerError("recorded, not dialled")
        yield  # pragma: no cover


def transfer(**kwargs: Any) -> TransferRequest:
    return TransferRequest(
        method="GET",
        target=f"{TAG}?ns=docker.io",
        expected_digest=None,
        is_blob=False,
        user_agent="spegla",
        reference="docker.io/library/app:v1",
        path=TAG,
        ns="docker.io",
        **kwargs,
    )


async def open_with(client: RecordingClient, peer: Peer, request: TransferRequest) -> None:
    async with AsyncExitStack() as stack:
        await open_transfer(
            client,  # type: ignore[arg-type]
            peer,
            request,
            stack,
            requested=None,
            expected_size=None,
            response_timeout=1.0,
            on_not_found=lambda: None,
        )


async def test_refused_addresses_never_reach_the_dialer() -> None:
    client = RecordingClient()
    request = transfer(authorization="Basic c2VjcmV0OnB3")
    for peer in (
        Peer(b"\x01" * 32, "169.254.169.254", 5000),
        Peer(b"\x02" * 32, "127.0.0.1", 5000),
        Peer(b"\x03" * 32, "fe80::1", 5000, more_hosts=("224.0.0.1", "0.0.0.0")),
        Peer(b"\x04" * 32, "10.213.0.9", 0),
    ):
        with pytest.raises(PeerError, match="refused peer address"):
            await open_with(client, peer, request)
    assert client.dialled == []
    # a record with one good address among bad ones: only the good one is dialled
    mixed = Peer(b"\x05" * 32, "169.254.169.254", 5000, more_hosts=("10.213.0.9", "fe80::2"))
    with pytest.raises(PeerError, match="recorded"):
        await open_with(client, mixed, request)
    assert [(h, p, also) for h, p, also, _ in client.dialled] == [("10.213.0.9", 5000, ())]
    # without a cluster key the Basic header goes, to that agent address only
    assert client.dialled[0][3]["Authorization"] == "Basic c2VjcmV0OnB3"


async def test_with_the_key_the_password_stays_home() -> None:
    client = RecordingClient()
    request = transfer(authorization="Basic c2VjcmV0OnB3", peer_auth=PeerAuth(CLUSTER_KEY))
    for _ in range(2):
        with pytest.raises(PeerError):
            await open_with(client, Peer(b"\x01" * 32, "10.213.0.9", 5000), request)
    sent = [headers["Authorization"] for *_, headers in client.dialled]
    assert all(value.startswith(SCHEME + " ") for value in sent)
    assert sent[0] != sent[1]  # a fresh nonce per request


def test_a_refused_address_is_no_provider_and_costs_no_attempt() -> None:
    attempts = MirrorAttempts("k", 3, allow_loopback=False)
    assert not attempts.usable(Peer(b"\x01" * 32, "169.254.169.254", 5000))
    assert not attempts.usable(Peer(b"\x02" * 32, "127.0.0.1", 5000))
    assert attempts.usable(Peer(b"\x03" * 32, "169.254.169.254", 5000, more_hosts=("10.0.0.3",)))
    assert attempts.failed == 0
    assert MirrorAttempts("k", 3, allow_loopback=True).usable(Peer(b"\x02" * 32, "::1", 5000))


async def test_the_mirror_never_dials_refused_providers() -> None:
    """The mirror path end to end over a router naming only refused addresses: the client that
    would dial records nothing, and the request is a plain miss (containerd goes upstream)."""
    network = MemoryNetwork()
    for i, host in enumerate(["169.254.169.254", "fe80::1", "224.0.0.1", "127.0.0.1", "0.0.0.0"]):
        network.add(DIGEST, Peer(bytes([i + 1]) * 32, host, 5000))
    client = RecordingClient()
    settings = MirrorSettings(resolve_timeout=0.05, allow_loopback_peers=False)
    forwarder = Forwarder(MemoryRouter(network), client, settings)  # type: ignore[arg-type]
    request = parse_request_path(f"/v2/library/app/blobs/{DIGEST}", "docker.io")
    assert isinstance(request, ContentRequest)
    send, receive = trio.open_memory_channel[Any](8)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(forwarder.run, MirrorJob(request, "GET", None, None, None), send)
        first = await receive.receive()
    assert isinstance(first, MirrorFailure) and first.status == 404
    assert "could not find peer" in first.message
    assert client.dialled == []


# --- the registry over loopback --------------------------------------------------------------


async def keyed_pair(
    start_node: StartNode,
    network: MemoryNetwork,
    provider: RegistrySettings,
    client: RegistrySettings,
) -> tuple[Any, Any, Any]:
    store = MemoryContentStore()
    content = fill(store)
    node = await start_node(store, settings=provider)
    for key in (content.config, content.layer, content.manifest, content.index, content.tag_key):
        network.add(key, node.peer)
    return node, content, await start_node(settings=client)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_tags_resolve_between_key_holders(
    method: str, start_node: StartNode, network: MemoryNetwork
) -> None:
    _, content, client = await keyed_pair(start_node, network, with_key(), FAST)
    async with client.client() as http:
        tag = await http.request(method, f"{TAG}?ns=docker.io")
    assert tag.status_code == 200
    assert tag.headers["docker-content-digest"] == content.index


async def test_a_node_with_another_key_is_not_believed(
    start_node: StartNode, network: MemoryNetwork
) -> None:
    rogue = with_key(key=b"the rogue's own key, 32 bytes!!!")
    _, content, client = await keyed_pair(start_node, network, rogue, FAST)
    async with client.client() as http:
        tag = await http.get(f"{TAG}?ns=docker.io")
        assert tag.status_code == 404
        # digests from it are still used: their bytes are verified
        blob = await http.get(f"/v2/library/app/blobs/{content.layer}?ns=docker.io")
        assert (blob.status_code, blob.content) == (200, content.layer_bytes)


async def test_a_tag_answer_without_a_valid_proof_is_a_failed_attempt(
    start_node: StartNode, start_scripted: StartScripted, network: MemoryNetwork
) -> None:
    forged = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json"}'
    liar = ScriptedPeer(
        "serve",
        body=forged,
        digest=DIGEST,
        media_type="application/vnd.oci.image.index.v1+json",
    )
    await start_scripted(liar)
    network.add("docker.io/library/app:v1", liar.peer)
    client = await start_node(settings=FAST)
    async with client.client() as http:
        for method in ("HEAD", "GET"):
            tag = await http.request(method, f"{TAG}?ns=docker.io")
            assert tag.status_code == 404
            assert "docker-content-digest" not in tag.headers
    # what the liar was sent: a credential it cannot turn into a proof, never a password
    assert [m for m, _, _ in liar.requests] == ["HEAD", "GET"]
    assert all(h["authorization"].startswith(SCHEME + " ") for _, _, h in liar.requests)


async def test_the_peer_credential_replaces_basic_auth(
    start_node: StartNode, start_scripted: StartScripted, network: MemoryNetwork
) -> None:
    auth = BasicAuth("spegla", "s3cret")
    keyed = with_key(RegistrySettings(mirror=FAST.mirror, basic_auth=auth))
    provider, content, client = await keyed_pair(start_node, network, keyed, keyed)
    spy = await start_scripted(ScriptedPeer("404"))
    missing = "sha256:" + "c" * 64
    network.add(missing, spy.peer)
    basic = {"Authorization": auth.header_value}
    async with client.client() as http:
        tag = await http.get(f"{TAG}?ns=docker.io", headers=basic)
        assert tag.status_code == 200
        blob = await http.get(f"/v2/library/app/blobs/{content.layer}?ns=docker.io", headers=basic)
        assert (blob.status_code, blob.content) == (200, content.layer_bytes)
        gone = await http.get(f"/v2/library/app/blobs/{missing}?ns=docker.io", headers=basic)
        assert gone.status_code == 404
    # the provider (Basic auth on) accepted the peer credential; the spy never got the password
    assert len(spy.requests) == 1
    headers = spy.requests[0][2]
    assert headers["authorization"].startswith(SCHEME + " ")
    assert auth.header_value not in str(spy.requests)
    async with provider.client() as http:
        assert (await http.get(f"{TAG}?ns=docker.io")).status_code == 401


async def test_a_replayed_credential_is_refused(
    start_node: StartNode, network: MemoryNetwork
) -> None:
    keyed = with_key(RegistrySettings(basic_auth=BasicAuth("spegla", "s3cret")))
    provider, content, _ = await keyed_pair(start_node, network, keyed, keyed)
    # a credential as an eavesdropper would capture it from another agent's request
    captured, _ = PeerAuth(CLUSTER_KEY).sign("GET", TAG, "docker.io", time.time())
    async with provider.client() as http:
        first = await http.get(f"{TAG}?ns=docker.io", headers={"Authorization": captured})
        again = await http.get(f"{TAG}?ns=docker.io", headers={"Authorization": captured})
        other = await http.get(
            f"/v2/library/app/manifests/{content.index}?ns=docker.io",
            headers={"Authorization": captured},
        )
    assert first.status_code == 200 and ANSWER_HEADER.lower() in first.headers
    assert again.status_code == 401 and other.status_code == 401


@pytest.mark.parametrize("registry_server", SERVERS)
async def test_a_replayed_credential_is_refused_for_a_local_blob_too(
    start_node: StartNode, tmp_path: Path
) -> None:
    """The one classification spends a credential whatever answers it: a file-backed blob sent
    by the zero-copy extension included."""
    store = MemoryContentStore()
    content = fill(store, files=tmp_path)
    keyed = with_key(RegistrySettings(basic_auth=BasicAuth("spegla", "s3cret")))
    node = await start_node(store, settings=keyed)
    path = f"/v2/library/app/blobs/{content.layer}"
    captured, _ = PeerAuth(CLUSTER_KEY).sign("GET", path, "docker.io", time.time())
    async with node.client() as http:
        first = await http.get(f"{path}?ns=docker.io", headers={"Authorization": captured})
        again = await http.get(f"{path}?ns=docker.io", headers={"Authorization": captured})
    assert (first.status_code, first.content) == (200, content.layer_bytes)
    assert again.status_code == 401


async def test_without_the_key_digests_still_come_from_peers(
    start_node: StartNode, network: MemoryNetwork
) -> None:
    plain = RegistrySettings(mirror=FAST.mirror)
    _, content, client = await keyed_pair(start_node, network, RegistrySettings(), plain)
    async with client.client() as http:
        tag = await http.get(f"{TAG}?ns=docker.io")
        assert tag.status_code == 404 and "without the cluster key" in tag.text
        manifest = await http.get(f"/v2/library/app/manifests/{content.manifest}?ns=docker.io")
        assert manifest.status_code == 200 and manifest.content == content.manifest_bytes
        blob = await http.get(f"/v2/library/app/blobs/{content.layer}?ns=docker.io")
        assert (blob.status_code, blob.content) == (200, content.layer_bytes)
    await trio.lowlevel.checkpoint()


def test_answer_header_name_is_stable() -> None:
    assert ANSWER_HEADER == "Spegla-Peer-Answer"
