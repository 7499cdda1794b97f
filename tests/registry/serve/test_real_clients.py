"""Pulls through the running registry app by a real containerd (`ctr images pull --hosts-dir`) and
by skopeo, with content served from a MemoryContentStore loaded from a built OCI image layout.

Everything stays on loopback: the "upstream" named in hosts.toml is a closed loopback port, so a
pull can only succeed through the app.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import trio

from registry.serve.app import Registry, RegistrySettings
from registry.serve.connection import AnswerStats
from registry.serve.server import run_registry
from tests.fakes import MemoryContentStore, MemoryNetwork, MemoryRouter
from tests.harness.containerd import Containerd
from tests.harness.images import BuiltImage, TestImages
from tests.registry.conftest import unreachable_peer

pytestmark = [pytest.mark.root]


def upstream_host() -> str:
    """A loopback host:port nobody listens on: the pretend upstream registry."""
    return f"127.0.0.1:{unreachable_peer().port}"


async def serve(
    nursery: trio.Nursery, store: MemoryContentStore, settings: RegistrySettings | None = None
) -> tuple[int, AnswerStats]:
    registry = Registry(store, MemoryRouter(MemoryNetwork()), settings or RegistrySettings())
    port = await nursery.start(functools.partial(run_registry, registry, "127.0.0.1", 0))
    return port, registry.stats


@pytest.mark.parametrize("which", ["small", "multi"])
async def test_containerd_pulls_through_the_app(
    which: str,
    test_images: TestImages,
    containerd_instance: Containerd,
    nursery: trio.Nursery,
) -> None:
    image: BuiltImage = getattr(test_images, which)
    upstream = upstream_host()
    repo = f"library/{image.name}"
    store = MemoryContentStore.from_oci_layout(image.path, f"{upstream}/{repo}")
    port, stats = await serve(nursery, store)
    containerd_instance.write_hosts_toml(
        upstream, f"http://{upstream}", [f"http://127.0.0.1:{port}"]
    )
    ref = f"{upstream}/{repo}:{image.tag}"
    result = await trio.run_process(
        containerd_instance.ctr(
            "-n",
            "k8s.io",
            "images",
            "pull",
            "--hosts-dir",
            str(containerd_instance.certs_d),
            ref,
        ),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    for digest in (*image.manifest_digests(), *image.blob_digests()):
        assert containerd_instance.has_blob(digest), digest
    listing = await trio.run_process(
        containerd_instance.ctr("-n", "k8s.io", "images", "ls", "-q"),
        capture_stdout=True,
    )
    assert ref in listing.stdout.decode().split()
    # every blob went out by the server's zero-copy extension, manifests as body messages, on
    # the same connections;
    # containerd 2.x's ctr (transfer service) also fetches the other platforms' configs
    blobs = len(image.blob_digests())
    if containerd_instance.line.major >= 2:
        blobs += len(image.manifests) - 1
    assert stats.served == blobs, (stats.served, stats.answered)
    assert stats.answered - stats.served >= len(image.manifest_digests())


async def test_skopeo_copies_through_the_app(
    test_images: TestImages, nursery: trio.Nursery, tmp_path: Path
) -> None:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo not installed")
    image = test_images.small
    store = MemoryContentStore.from_oci_layout(image.path, f"docker.io/library/{image.name}")
    port, _ = await serve(nursery, store, RegistrySettings(default_registry="docker.io"))
    dest = tmp_path / "copy"
    result = await trio.run_process(
        [
            "skopeo",
            "copy",
            "--src-tls-verify=false",
            "--retry-times=0",
            f"docker://127.0.0.1:{port}/library/{image.name}:{image.tag}",
            f"oci:{dest}:{image.tag}",
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    index = json.loads((dest / "index.json").read_text())
    assert index["manifests"][0]["digest"] == image.top_digest
    for digest in image.blob_digests():
        assert (dest / "blobs" / "sha256" / digest.removeprefix("sha256:")).exists()
