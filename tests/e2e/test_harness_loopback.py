"""Proves the loopback building blocks: reproducible images, the registry's access log, an isolated
containerd and the CRI client (pull, status, list, remove)."""

from __future__ import annotations

import gzip
import io
import tarfile
import tomllib
from pathlib import Path

import pytest

from tests.harness import images
from tests.harness.containerd import Containerd, hosts_toml
from tests.harness.cri import CriClient, CriError
from tests.harness.upstream import Upstream, parse_access_line


def test_images_are_reproducible_and_valid(tmp_path: Path) -> None:
    a = images.make_layer("seed", [1000, 20])
    b = images.make_layer("seed", [1000, 20])
    assert a == b
    assert images.make_layer("other", [1000, 20])[0] != a[0]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(a[0]))) as tar:
        members = tar.getmembers()
    assert [m.size for m in members if m.isfile()] == [1000, 20]
    assert all(m.mtime == 0 for m in members)
    one = images.build_large(tmp_path / "one", 1)
    two = images.build_large(tmp_path / "two", 1)
    assert one.top_digest == two.top_digest
    assert one.blob_digests() == two.blob_digests()


def test_access_log_line_is_parsed() -> None:
    line = (
        '10.213.0.11 - - [28/Nov/2026:00:33:04 +0000] "GET /v2/e2e/small/blobs/sha256:'
        + "a" * 64
        + ' HTTP/1.1" 200 615025 "" "containerd/1.6.20~ds1"'
    )
    rec = parse_access_line(line)
    assert rec is not None
    assert (rec.remote_ip, rec.method, rec.status, rec.bytes) == ("10.213.0.11", "GET", 200, 615025)
    assert rec.blob_digest == "sha256:" + "a" * 64
    assert parse_access_line('time="x" level=info msg="response completed"') is None


def test_hosts_toml_has_a_host_table_and_explicit_scheme() -> None:
    doc = tomllib.loads(hosts_toml("http://10.213.0.2:5000", ["http://127.0.0.1:5000"]))
    assert doc["server"] == "http://10.213.0.2:5000"
    assert doc["host"] == {"http://127.0.0.1:5000": {"capabilities": ["pull", "resolve"]}}


@pytest.mark.root
def test_cri_pull_from_loopback_upstream(
    upstream_registry: Upstream,
    test_images: images.TestImages,
    containerd_instance: Containerd,
    cri_client: CriClient,
) -> None:
    small = test_images.small
    ref = upstream_registry.pushed["small"]
    mark = upstream_registry.mark()
    image_id = cri_client.pull(ref)
    assert image_id == small.for_platform().config.digest
    st = cri_client.status(ref)
    assert st is not None and f"{ref.rsplit(':', 1)[0].rsplit('/', 2)[0]}" in st.repo_tags[0]
    assert any(small.top_digest in d for d in st.repo_digests)
    for digest in small.blob_digests():
        assert containerd_instance.has_blob(digest)
    fetched = {r.blob_digest for r in upstream_registry.blob_fetches(mark)}
    assert fetched == set(small.blob_digests())
    assert any(i.id == image_id for i in cri_client.list())
    cri_client.remove(ref)
    assert cri_client.status(ref) is None


@pytest.mark.root
def test_cri_pull_of_unknown_image_is_a_clear_error(
    upstream_registry: Upstream, cri_client: CriClient
) -> None:
    with pytest.raises(CriError) as e:
        cri_client.pull(f"{upstream_registry.host}/e2e/absent:v1", timeout=30)
    assert "not found" in str(e.value)
