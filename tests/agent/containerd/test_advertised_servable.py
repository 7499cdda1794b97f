"""Every key a node advertises is one its registry serves to a peer (no 404 for advertised keys).

Why: a peer that advertises a key and then answers a forwarded request (`X-Spegel-Mirrored:
true`) for it with 404 costs every puller a fail-over.  This runs the real path on loopback:
images pulled into a real containerd through CRI (tag, digest, index, Docker v2s2) and records
created the way `ctr` names them, the state tracker's full sync, and the registry app on the
containerd-backed store, asked for each advertised key the way a requesting peer asks for it.
The first test is the same check of tag keys without containerd (fakes), so it runs anywhere.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from collections.abc import Iterator

import httpx
import pytest
import trio

from agent.advertising.state import StateTracker
from agent.containerd.client import open_containerd
from agent.containerd.content_store import ContainerdContentStore
from agent.containerd.image_walk import AdvertisedImage
from registry.oci.mediatypes import is_manifest_media_type
from registry.serve.app import Registry
from registry.serve.server import run_registry
from tests.agent.containerd.fakes import OCI_MANIFEST, FakeContent, RecordingRouter
from tests.fakes import MemoryRouter
from tests.harness.containerd import Containerd
from tests.harness.cri import CriClient
from tests.harness.images import TestImages as ImageSet
from tests.harness.upstream import Upstream

pytestmark = pytest.mark.root
NS = "k8s.io"
MIRRORED = {"X-Spegel-Mirrored": "true"}


async def test_every_advertised_tag_key_resolves_in_the_store() -> None:
    fake = FakeContent()
    target = fake.add_image(b"app", OCI_MANIFEST)
    names = [
        "example.com/app:v1",
        "example.com/app@" + target.digest,
        "example.com/app:pinned@" + target.digest,  # how ctr names a pinned pull or tag
        "example.com:5000/team/app:v2",
    ]
    for name in names:
        fake.tag(name, target)
    router = RecordingRouter()
    await StateTracker(fake, router).sync()  # type: ignore[arg-type]
    store = ContainerdContentStore(fake, direct_reads=False)  # type: ignore[arg-type]
    tags = {k for k in router.keys if not k.startswith("sha256:")}
    assert tags == {"example.com/app:v1", "example.com:5000/team/app:v2"}
    for key in tags:
        assert await store.resolve_tag(key) == target.digest


def _ctr(ctd: Containerd, *args: str) -> None:
    argv = ctd.ctr("-n", NS, *args)
    subprocess.run(argv, check=True, capture_output=True)


def _requests(images: list[AdvertisedImage]) -> Iterator[tuple[str, str, str]]:
    """(key, manifests path, blobs path) for every key, in the image's own repository."""
    for img in images:
        base = f"/v2/{img.repository}"
        ns = f"?ns={img.registry}"
        if img.tag_key is not None:
            tag = img.tag_key.rsplit(":", 1)[1]
            yield img.tag_key, f"{base}/manifests/{tag}{ns}", ""
        for digest in sorted(img.digests):
            yield digest, f"{base}/manifests/{digest}{ns}", f"{base}/blobs/{digest}{ns}"


async def test_every_advertised_key_is_served_to_a_mirrored_request(
    containerd_instance: Containerd,
    upstream_registry: Upstream,
    test_images: ImageSet,
    nursery: trio.Nursery,
) -> None:
    cri = CriClient(containerd_instance.socket)
    small, multi, docker = (upstream_registry.pushed[n] for n in ("small", "multi", "docker"))
    small_by_digest = small.rsplit(":", 1)[0] + "@" + test_images.small.top_digest
    for ref in (small, small_by_digest, multi, docker):
        await trio.to_thread.run_sync(cri.pull, ref)
    # `ctr` keeps names verbatim: a record named by tag *and* digest (ctr pull/tag of a pinned
    # reference) and a second tag of the same index
    pinned = small.rsplit(":", 1)[0] + ":pinned@" + test_images.small.top_digest
    retagged = multi.rsplit(":", 1)[0] + ":again"
    await trio.to_thread.run_sync(_ctr, containerd_instance, "images", "tag", small, pinned)
    await trio.to_thread.run_sync(_ctr, containerd_instance, "images", "tag", multi, retagged)

    async with open_containerd(str(containerd_instance.socket), NS) as client:
        names = {i.name for i in await client.list_images()}
        assert pinned in names and retagged in names
        router = RecordingRouter()
        tracker = StateTracker(client, router)  # type: ignore[arg-type]
        await tracker.sync()
        images = tracker.advertised_images()
        assert router.keys and set(tracker.keys()) == router.keys

        store = ContainerdContentStore(client, str(containerd_instance.content_path))
        registry = Registry(store, MemoryRouter())
        port = await nursery.start(functools.partial(run_registry, registry, "127.0.0.1", 0))
        failures: list[str] = []
        served: set[str] = set()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as http:
            for key, manifest_path, blob_path in _requests(images):
                answers = []
                for path in (manifest_path, blob_path):
                    if not path:
                        continue
                    for method in ("HEAD", "GET"):
                        r = await http.request(method, path, headers=MIRRORED)
                        answers.append((method, path, r))
                ok = [(m, p, r) for m, p, r in answers if r.status_code == 200]
                if not ok:
                    codes = [(m, p, r.status_code) for m, p, r in answers]
                    failures.append(f"{key}: {codes}")
                    continue
                served.add(key)
                for method, path, r in ok:
                    kind = "manifests" if "/manifests/" in path else "blobs"
                    # a key is a manifest or a blob, never both; the answer matches its kind
                    assert is_manifest_media_type(r.headers["content-type"]) == (
                        kind == "manifests"
                    ), (key, path, r.headers["content-type"])
                    if method == "GET" and key.startswith("sha256:"):
                        assert "sha256:" + hashlib.sha256(r.content).hexdigest() == key
        nursery.cancel_scope.cancel()

    assert failures == [], "advertised keys a peer would get 404 for"
    assert served == router.keys
