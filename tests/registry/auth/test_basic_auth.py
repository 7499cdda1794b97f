"""Basic auth (issue 12, item 1): the pure check, the credential files, and the registry over real
loopback sockets: the zero-copy path and the app both answer 401 before any lookup, the probes stay
open, and a mirror request carries the credentials to the peer."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import h11
import pytest
import trio

from registry.auth.basic import BasicAuth, BasicAuthError, authorized, load_basic_auth
from registry.serve.app import RegistrySettings
from tests.fakes import MemoryContentStore, MemoryNetwork
from tests.registry.conftest import Content, Node, ScriptedPeer, StartNode, StartScripted, fill
from tests.registry.mirror.test_mirror_peers import FAST
from tests.registry.serve.test_local_blobs import exchange

AUTH = BasicAuth("spegla", "s3cret:with colon")
GOOD = AUTH.header_value
MISSING = "sha256:" + "0" * 64


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_header_value_round_trips() -> None:
    assert GOOD == basic("spegla", "s3cret:with colon")
    assert authorized(AUTH, GOOD)
    assert authorized(AUTH, "basic " + GOOD.split()[1])  # the scheme is case-insensitive
    assert "s3cret" not in repr(AUTH)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Basic",
        "Bearer " + GOOD.split()[1],
        basic("spegla", "s3cret"),
        basic("spegla", "s3cret:with colon "),
        basic("SPEGLA", "s3cret:with colon"),
        basic("", "s3cret:with colon"),
        "Basic " + base64.b64encode(b"spegla").decode(),  # no colon
        "Basic !!!notbase64",
        "Basic " + GOOD.split()[1] + "=",
    ],
)
def test_wrong_or_missing_credentials_are_refused(header: str | None) -> None:
    assert not authorized(AUTH, header)


def test_no_credentials_configured_means_open() -> None:
    assert authorized(None, None) and authorized(None, "Basic whatever")


def test_username_only_and_password_only() -> None:
    assert authorized(BasicAuth("user", ""), basic("user", ""))
    assert not authorized(BasicAuth("user", ""), basic("user", "x"))
    assert authorized(BasicAuth("", "pw"), basic("", "pw"))


def test_load_from_files(tmp_path: Path) -> None:
    assert load_basic_auth(str(tmp_path)) is None
    assert load_basic_auth(str(tmp_path / "absent")) is None
    assert load_basic_auth("") is None
    (tmp_path / "username").write_text("alice\n")
    assert load_basic_auth(str(tmp_path)) == BasicAuth("alice", "")
    (tmp_path / "password").write_text("pa ss\r\n")
    assert load_basic_auth(str(tmp_path)) == BasicAuth("alice", "pa ss")
    (tmp_path / "username").unlink()
    assert load_basic_auth(str(tmp_path)) == BasicAuth("", "pa ss")


@pytest.mark.parametrize(
    ("name", "data", "needle"),
    [
        ("username", b"a:b", "cannot contain ':'"),
        ("password", b"one\ntwo\n", "more than one line"),
        ("password", b"\xff\xfe", "not UTF-8"),
        ("password", b"x" * 5000, "longer than"),
    ],
)
def test_unusable_files_are_errors(tmp_path: Path, name: str, data: bytes, needle: str) -> None:
    (tmp_path / name).write_bytes(data)
    with pytest.raises(BasicAuthError, match=needle):
        load_basic_auth(str(tmp_path))


def test_unreadable_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "password").mkdir()  # unreadable as a file, for root too
    with pytest.raises(BasicAuthError, match="cannot read"):
        load_basic_auth(str(tmp_path))


# --- over real sockets -----------------------------------------------------------------------


async def auth_node(start_node: StartNode, tmp_path: Path) -> tuple[Content, Node]:
    store = MemoryContentStore()
    content = fill(store, files=tmp_path)
    node = await start_node(store, settings=RegistrySettings(basic_auth=AUTH))
    return content, node


def unauthorized(status: int, headers: dict[str, str], body: bytes) -> bool:
    if status != 401:
        return False
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    assert "www-authenticate" not in {k.lower() for k in headers}
    errors = json.loads(body)["errors"]
    return bool(errors == [{"code": "UNAUTHORIZED", "message": "invalid credentials"}])


async def test_every_registry_route_needs_credentials(
    start_node: StartNode, tmp_path: Path
) -> None:
    content, node = await auth_node(start_node, tmp_path)
    layer = f"/v2/library/app/blobs/{content.layer}?ns=docker.io"
    targets = [
        layer,  # a local file-backed blob
        f"/v2/library/app/blobs/{MISSING}?ns=docker.io",
        f"/v2/library/app/manifests/{content.manifest}?ns=docker.io",
        "/v2/library/app/manifests/v1?ns=docker.io",
        "/v2/library/app/manifests/nosuchtag?ns=docker.io",
        "/v2/",
        "/v2/not/a/valid/path",
        "/metrics",
    ]
    wrong = (("Authorization", basic("spegla", "guess")),)
    stream = await trio.open_tcp_stream("127.0.0.1", node.port)
    conn = h11.Connection(h11.CLIENT)
    seen: set[tuple[int, bytes]] = set()
    for target in targets:
        for method in ("GET", "HEAD"):
            for headers in ((), wrong):
                status, response_headers, body = await exchange(
                    stream, conn, target, method, headers
                )
                if method == "GET":
                    assert unauthorized(status, response_headers, body), (target, status, body)
                else:
                    assert status == 401 and body == b""
                response_headers.pop("date", None)
                seen.add((status, json.dumps(sorted(response_headers.items())).encode() + body))
    # one answer whatever was asked: nothing tells what the node holds
    assert len(seen) == 2  # the GET and the HEAD form
    assert node.stats.served == 0
    for method in ("POST", "DELETE"):
        status, response_headers, body = await exchange(stream, conn, layer, method)
        assert unauthorized(status, response_headers, body)
    # the probes stay open
    for probe in ("/livez", "/readyz"):
        status, _, _ = await exchange(stream, conn, probe)
        assert status in (200, 500)
    # with the right credentials a fresh connection gets content, the blob by the zero-copy
    # extension
    await stream.aclose()
    stream = await trio.open_tcp_stream("127.0.0.1", node.port)
    conn = h11.Connection(h11.CLIENT)
    good = (("Authorization", GOOD),)
    status, _, body = await exchange(stream, conn, layer, "GET", good)
    assert (status, body) == (200, content.layer_bytes)
    assert node.stats.served == 1
    status, _, body = await exchange(
        stream, conn, "/v2/library/app/manifests/v1?ns=docker.io", "GET", good
    )
    assert status == 200 and json.loads(body)["mediaType"].endswith("index.v1+json")
    status, _, _ = await exchange(
        stream, conn, f"/v2/library/app/blobs/{MISSING}?ns=docker.io", "GET", good
    )
    assert status == 404
    await stream.aclose()


async def test_mirror_sends_credentials_to_peers(
    start_node: StartNode, network: MemoryNetwork, tmp_path: Path
) -> None:
    provider_store = MemoryContentStore()
    content = fill(provider_store, files=tmp_path)
    provider = await start_node(provider_store, settings=RegistrySettings(basic_auth=AUTH))
    for key in (content.layer, content.manifest, content.tag_key, content.index):
        network.add(key, provider.peer)
    with_auth = await start_node(settings=RegistrySettings(mirror=FAST.mirror, basic_auth=AUTH))
    without_auth = await start_node(settings=FAST)
    layer = f"/v2/library/app/blobs/{content.layer}?ns=docker.io"
    async with with_auth.client() as http:
        refused = await http.get(layer)
        assert refused.status_code == 401
        blob = await http.get(layer, headers={"Authorization": GOOD})
        assert (blob.status_code, blob.content) == (200, content.layer_bytes)
        # no cluster key: a tag is never resolved through peers (serve/test_peer_trust.py)
        tag = await http.get(
            "/v2/library/app/manifests/v1?ns=docker.io", headers={"Authorization": GOOD}
        )
        assert tag.status_code == 404 and "without the cluster key" in tag.text
        manifest = await http.get(
            f"/v2/library/app/manifests/{content.index}?ns=docker.io",
            headers={"Authorization": GOOD},
        )
        assert manifest.status_code == 200
    async with without_auth.client() as http:
        # the provider refuses a peer that does not send the credentials: a miss here
        blob = await http.get(layer)
        assert blob.status_code == 404


async def test_peer_request_carries_the_authorization_header(
    start_node: StartNode, start_scripted: StartScripted, network: MemoryNetwork
) -> None:
    body = b"layer bytes " * 100
    from tests.fakes import sha256_digest

    digest = sha256_digest(body)
    peer = await start_scripted(ScriptedPeer("serve", body=body, digest=digest))
    network.add(digest, peer.peer)
    node = await start_node(settings=RegistrySettings(mirror=FAST.mirror, basic_auth=AUTH))
    async with node.client() as http:
        answer = await http.get(
            f"/v2/library/app/blobs/{digest}?ns=docker.io", headers={"Authorization": GOOD}
        )
    assert (answer.status_code, answer.content) == (200, body)
    assert [headers.get("authorization") for _, _, headers in peer.requests] == [GOOD]
    assert peer.requests[0][2]["x-spegel-mirrored"] == "true"
