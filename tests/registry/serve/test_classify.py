"""The one classification of a request (pure over its facts), and the one store lookup."""

from __future__ import annotations

import time

import pytest

from registry.auth.basic import BasicAuth
from registry.auth.peer import PeerAuth
from registry.interfaces import Descriptor, IngestFile
from registry.oci.distribution import ErrorCode
from registry.oci.filters import ReferenceFilter
from registry.oci.mediatypes import OCI_MANIFEST
from registry.serve.app import query_value
from registry.serve.classify import (
    Empty,
    Found,
    InflightBlob,
    LocalBlob,
    LocalManifest,
    Mirror,
    OciError,
    Readiness,
    RequestFacts,
    Rules,
    Unauthorized,
    Wanted,
    classify,
    decide,
    look_up,
)
from tests.fakes import MemoryContentStore
from tests.registry.conftest import StartNode

DIGEST = "sha256:" + "ab" * 32
BLOB = f"/v2/library/app/blobs/{DIGEST}"
AUTH = BasicAuth("spegla", "s3cret")
KEY = b"test cluster key: 32 bytes long!"


def facts(path: str = BLOB, method: str = "GET", **more: object) -> RequestFacts:
    return RequestFacts(method=method, path=path, ns="docker.io", **more)  # type: ignore[arg-type]


def wanted(plan: object) -> Wanted:
    assert isinstance(plan, Wanted), plan
    return plan


@pytest.mark.parametrize(
    "path",
    [BLOB, "/v2/", "/v2/not a path", "/v2/library/app/manifests/v1", "/metrics", "/"],
)
@pytest.mark.parametrize("method", ["GET", "HEAD", "POST"])
def test_without_credentials_everything_but_the_probes_is_unauthorized_first(
    path: str, method: str
) -> None:
    rules = Rules(basic_auth=AUTH)
    assert classify(facts(path, method), rules) == Unauthorized()
    # a peer's blob GET too: no admission (no 429) is even considered
    assert classify(facts(path, method, mirrored=True), rules) == Unauthorized()
    assert classify(facts("/readyz", "GET"), rules) == Readiness()
    assert classify(facts("/livez", "HEAD"), rules) == Empty(200)


def test_routes_methods_paths_filters_and_ranges() -> None:
    rules = Rules(filters=ReferenceFilter.from_config(["https://docker.io"]))
    assert classify(facts(method="DELETE"), rules) == Empty(404)
    assert classify(facts("/metrics"), rules) == Empty(404)
    assert classify(facts("/v2/"), rules) == Empty(200)
    bad = classify(facts("/v2/UPPER/blobs/" + DIGEST), rules)
    assert isinstance(bad, OciError) and bad.status == 404
    other = RequestFacts(method="GET", path=BLOB, ns="ghcr.io")
    assert classify(other, rules) == Empty(404)  # not a mirrored registry
    no_ns = classify(RequestFacts(method="GET", path=BLOB, ns=None), rules)
    assert isinstance(no_ns, OciError) and no_ns.status == 404  # no default registry
    bad_range = classify(facts(range_header="bytes=5-1"), rules)
    assert isinstance(bad_range, OciError) and bad_range.status == 400
    assert bad_range.code is ErrorCode.RANGE_INVALID
    ok = wanted(classify(facts(range_header="bytes=0-9"), rules))
    assert ok.range_spec is not None and ok.credential is None


def test_only_a_peers_blob_get_is_an_upload() -> None:
    rules = Rules()
    assert wanted(classify(facts(mirrored=True), rules)).upload == DIGEST
    assert wanted(classify(facts(), rules)).upload is None
    assert wanted(classify(facts(method="HEAD", mirrored=True), rules)).upload is None
    manifest = facts("/v2/library/app/manifests/v1", mirrored=True)
    assert wanted(classify(manifest, rules)).upload is None


def test_a_peer_credential_is_spent_by_classifying() -> None:
    auth = PeerAuth(KEY)
    rules = Rules(basic_auth=AUTH, peer_auth=auth)
    header, nonce = auth.sign("GET", BLOB, "docker.io", time.time())
    first = wanted(classify(facts(authorization=header), rules))
    assert first.credential is not None and first.credential.nonce == nonce
    assert classify(facts(authorization=header), rules) == Unauthorized()  # a replay


BLOB_DESCRIPTOR = Descriptor(DIGEST, 100, "application/vnd.oci.image.layer.v1.tar+gzip")
MANIFEST_DESCRIPTOR = Descriptor(DIGEST, 50, OCI_MANIFEST)
INGEST = IngestFile(DIGEST, 100, "/nonexistent/data", "/nonexistent/blob")


def test_decisions_once_the_store_answered() -> None:
    rules = Rules()
    get = wanted(classify(facts(), rules))
    local = decide(get, Found(BLOB_DESCRIPTOR), rules)
    assert isinstance(local, LocalBlob)
    assert (local.status, local.offset, local.length, local.head_only) == (200, 0, 100, False)
    assert dict(local.headers)["Content-Length"] == "100"
    ranged = wanted(classify(facts(range_header="bytes=-10"), rules))
    tail = decide(ranged, Found(BLOB_DESCRIPTOR), rules)
    assert isinstance(tail, LocalBlob) and (tail.status, tail.offset, tail.length) == (206, 90, 10)
    outside = wanted(classify(facts(range_header="bytes=200-"), rules))
    unsatisfiable = decide(outside, Found(BLOB_DESCRIPTOR), rules)
    assert isinstance(unsatisfiable, OciError) and unsatisfiable.status == 416
    assert dict(unsatisfiable.headers)["Content-Range"] == "bytes */100"
    as_blob = decide(get, Found(MANIFEST_DESCRIPTOR), rules)
    assert isinstance(as_blob, OciError) and as_blob.code is ErrorCode.BLOB_UNKNOWN
    missing = decide(get, Found(), rules)
    assert isinstance(missing, Mirror) and missing.job.method == "GET"
    peer = wanted(classify(facts(mirrored=True), rules))
    assert isinstance(decide(peer, Found(), rules), OciError)  # never mirrored on
    inflight = decide(peer, Found(ingest=INGEST), rules)
    assert isinstance(inflight, InflightBlob) and inflight.length == 100


def test_manifests_and_tags() -> None:
    rules = Rules()
    by_digest = wanted(classify(facts(f"/v2/library/app/manifests/{DIGEST}", "HEAD"), rules))
    manifest = decide(by_digest, Found(MANIFEST_DESCRIPTOR), rules)
    assert isinstance(manifest, LocalManifest) and manifest.head_only
    not_one = decide(by_digest, Found(BLOB_DESCRIPTOR), rules)
    assert isinstance(not_one, OciError) and not_one.code is ErrorCode.MANIFEST_UNKNOWN
    tag = wanted(classify(facts("/v2/library/app/manifests/v1"), rules))
    no_key = decide(tag, Found(), rules)
    assert isinstance(no_key, OciError) and "without the cluster key" in no_key.message
    keyed = Rules(peer_auth=PeerAuth(KEY))
    assert isinstance(decide(tag, Found(), keyed), Mirror)


class CountingStore(MemoryContentStore):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    async def resolve_tag(self, reference: str) -> str:
        self.calls.append("resolve_tag")
        return await super().resolve_tag(reference)

    async def describe(self, digest: str) -> Descriptor:
        self.calls.append("describe")
        return await super().describe(digest)


async def test_the_store_is_asked_once_per_request() -> None:
    store = CountingStore()
    rules = Rules()
    held = store.add(b"layer bytes")
    for digest, expected in ((held, True), (DIGEST, False)):
        store.calls.clear()
        request = wanted(classify(facts(f"/v2/library/app/blobs/{digest}"), rules))
        found = await look_up(request, store)
        assert (found.descriptor is not None) == expected
        assert store.calls == ["describe"]  # a hit or a miss: one question
    store.tag("docker.io/library/app:v1", held)
    store.calls.clear()
    tag = wanted(classify(facts("/v2/library/app/manifests/v1"), rules))
    assert (await look_up(tag, store)).descriptor is not None
    assert store.calls == ["resolve_tag", "describe"]  # the tag's one lookup


async def test_a_miss_through_the_app_asks_the_store_once(start_node: StartNode) -> None:
    store = CountingStore()
    node = await start_node(store)
    async with node.client() as http:
        miss = await http.get(f"{BLOB}?ns=docker.io")  # no provider: the mirror's 404
    assert miss.status_code == 404
    assert store.calls == ["describe"]


def test_the_ns_query_value_is_read_like_a_form() -> None:
    assert query_value(b"", "ns") is None
    assert query_value(b"ns=docker.io", "ns") == "docker.io"
    assert query_value(b"a=1&ns=ghcr.io&ns=quay.io", "ns") == "ghcr.io"  # the first one
    assert query_value(b"n%73=a%2Eb+c", "ns") == "a.b c"
    assert query_value(b"nsx=1&ns", "ns") == ""
    assert query_value(b"other=ns", "ns") is None
