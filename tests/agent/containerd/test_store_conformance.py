"""The containerd-backed `ContentStore` passes the conformance checks the in-memory fake passes.

Real containerd (each line of the harness), images pulled through CRI from the loopback upstream;
the expected bytes come from the images as built, never from containerd itself.  Both read paths
are checked: files in the content directory (`direct_reads`) and containerd's Read stream.
"""

from __future__ import annotations

import pytest
import trio

from agent.containerd.client import open_containerd
from agent.containerd.content_store import ContainerdContentStore
from tests.harness.containerd import Containerd
from tests.harness.cri import CriClient
from tests.harness.images import TestImages
from tests.harness.upstream import Upstream
from tests.registry.conformance import check_content_store

pytestmark = pytest.mark.root
NS = "k8s.io"


async def test_the_containerd_store_passes_the_conformance_checks(
    containerd_instance: Containerd, upstream_registry: Upstream, test_images: TestImages
) -> None:
    cri = CriClient(containerd_instance.socket)
    images = {"multi": test_images.multi, "docker": test_images.docker}  # OCI index, Docker v2s2
    for name in images:
        await trio.to_thread.run_sync(cri.pull, upstream_registry.pushed[name])
    blobs = {
        digest: image.read(digest)
        for image in images.values()
        for digest in (*image.manifest_digests(), *image.blob_digests())
    }
    tags = {upstream_registry.pushed[name]: image.top_digest for name, image in images.items()}
    async with open_containerd(str(containerd_instance.socket), NS) as client:
        for direct in (True, False):
            store = ContainerdContentStore(
                client, str(containerd_instance.content_path), direct_reads=direct
            )
            await check_content_store(store, blobs, tags)
