"""The containerd client, content store, state tracker and `spegla keys` against a real containerd.

Images are pulled through CRI (the kubelet path) from the loopback upstream registry of the test
harness; deletes go through `ctr` so single image records can be removed.
"""

from __future__ import annotations

import hashlib
import subprocess
import tarfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from prometheus_client import REGISTRY

from agent.advertising.keys import collect_keys
from agent.advertising.state import StateTracker
from agent.containerd.client import (
    ContainerdClient,
    ContainerdUnavailable,
    NotFound,
    open_containerd,
)
from agent.containerd.content_store import SIZE_TTL, ContainerdContentStore
from registry.interfaces import ContentNotFound
from registry.oci.mediatypes import (
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    OCTET_STREAM,
)
from tests.agent.containerd.fakes import RecordingRouter
from tests.harness.containerd import Containerd
from tests.harness.cri import CriClient
from tests.harness.images import BuiltImage, build_large
from tests.harness.images import TestImages as ImageSet
from tests.harness.upstream import Upstream

pytestmark = pytest.mark.root
NS = "k8s.io"


def expected_keys(image: BuiltImage, ref: str | None) -> set[str]:
    """What a node that pulled `image` (amd64 only) must advertise."""
    keys = {*image.manifest_digests("amd64"), *image.blob_digests("amd64")}
    return keys | ({ref} if ref else set())


async def pull(cri: CriClient, ref: str) -> None:
    await trio.to_thread.run_sync(cri.pull, ref)


async def ctr_rm(ctd: Containerd, *names: str) -> None:
    argv = ctd.ctr("-n", NS, "images", "rm", *names)
    await trio.to_thread.run_sync(lambda: subprocess.run(argv, check=True, capture_output=True))


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    with trio.move_on_after(20):  # a bound against hangs, not a speed assertion
        while True:  # state changes arrive from another task; poll it
            if predicate():
                return
            await trio.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


@asynccontextmanager
async def running_tracker(
    client: ContainerdClient, router: RecordingRouter, **kw: object
) -> AsyncIterator[StateTracker]:
    tracker = StateTracker(client, router, backoff_initial=0.05, **kw)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(tracker.run)
        yield tracker
        nursery.cancel_scope.cancel()


async def test_missing_socket_and_bad_namespace_are_clear_errors(tmp_path: object) -> None:
    with pytest.raises(ContainerdUnavailable, match="does not exist"):
        async with open_containerd("/nonexistent/containerd.sock", NS):
            pass
    with pytest.raises(ValueError, match="namespace"):
        async with open_containerd("/nonexistent/containerd.sock", "no spaces"):
            pass


async def test_stopped_containerd_is_unavailable(containerd_instance: Containerd) -> None:
    async with open_containerd(str(containerd_instance.socket), NS) as client:
        assert (await client.version()).version
        await trio.to_thread.run_sync(containerd_instance.stop)
        with pytest.raises(ContainerdUnavailable):
            await client.list_images()
    with pytest.raises(ContainerdUnavailable):
        async with open_containerd(str(containerd_instance.socket), NS):
            pass


async def test_sync_walks_tag_index_digest_and_docker_pulls(
    containerd_instance: Containerd, upstream_registry: Upstream, test_images: ImageSet
) -> None:
    cri = CriClient(containerd_instance.socket)
    small, multi, docker = (upstream_registry.pushed[n] for n in ("small", "multi", "docker"))
    small_by_digest = small.rsplit(":", 1)[0] + "@" + test_images.small.top_digest
    for ref in (small_by_digest, multi, docker):
        await pull(cri, ref)

    async with open_containerd(str(containerd_instance.socket), NS) as client:
        assert await client.list_statuses() == []  # no ingest left once pulls are done
        names = {i.name for i in await client.list_images()}
        assert small_by_digest in names and multi in names  # tag + digest + id records
        router = RecordingRouter()
        tracker = StateTracker(client, router)  # type: ignore[arg-type]
        await tracker.sync()

    want = (
        expected_keys(test_images.small, None)  # a digest-only pull has no tag key
        | expected_keys(test_images.multi, multi)  # index + the amd64 platform only
        | expected_keys(test_images.docker, docker)
    )
    assert router.keys == want
    arm = test_images.multi.for_platform("arm64")
    assert not {arm.descriptor.digest, *arm.blob_digests()} & router.keys
    host = small.split("/", 1)[0]
    sample = REGISTRY.get_sample_value
    assert sample("spegel_advertised_image_tags", {"registry": host}) == 2
    assert sample("spegel_advertised_image_digests", {"registry": host}) == 1
    assert sample("spegel_advertised_images", {"registry": host}) == 3
    assert sample("spegel_advertised_keys", {"registry": host}) == len(want)

    keys = await collect_keys(str(containerd_instance.socket), NS)
    assert keys == sorted(want)
    filtered = await collect_keys(str(containerd_instance.socket), NS, [], ["/e2e/multi"])
    assert set(filtered) == want - expected_keys(test_images.multi, multi)
    assert await collect_keys(str(containerd_instance.socket), NS, ["https://other.test"]) == []


async def test_store_serves_only_namespace_content_and_bytes_hash_to_digest(
    containerd_instance: Containerd, upstream_registry: Upstream, test_images: ImageSet
) -> None:
    cri = CriClient(containerd_instance.socket)
    for name in ("multi", "docker", "big"):
        await pull(cri, upstream_registry.pushed[name])
    sock = str(containerd_instance.socket)
    async with open_containerd(sock, NS) as client:
        infos = await client.list_content()
        assert len(infos) >= 10
        for direct in (True, False):
            store = ContainerdContentStore(client, "", direct_reads=direct)
            assert (await store.content_dir() is not None) is direct
            for info in infos:
                desc = await store.describe(info.digest)
                assert desc.size == info.size
                async with store.open(info.digest) as reader:
                    assert (reader.path is not None) is direct
                    h = hashlib.sha256()
                    async for chunk in reader.read(0, reader.size):
                        h.update(chunk)
                    assert "sha256:" + h.hexdigest() == info.digest
                    tail = b"".join([c async for c in reader.read(reader.size - 7, 7)])
                    assert len(tail) == 7
                    with pytest.raises(ValueError):
                        reader.read(1, reader.size)
        store = ContainerdContentStore(client, str(containerd_instance.content_path))
        multi = test_images.multi
        assert await store.resolve_tag(upstream_registry.pushed["multi"]) == multi.top_digest
        types = {
            multi.top_digest: OCI_INDEX,
            multi.for_platform().descriptor.digest: OCI_MANIFEST,
            multi.for_platform().config.digest: OCI_CONFIG,
            multi.for_platform().layers[0].digest: OCTET_STREAM,
            test_images.docker.top_digest: DOCKER_MANIFEST,
        }
        for digest, media_type in types.items():
            assert (await store.describe(digest)).media_type == media_type
        absent = multi.for_platform("arm64").descriptor.digest
        for bad in (absent, "sha256:nothex", "../../etc/passwd"):
            with pytest.raises(ContentNotFound):
                await store.describe(bad)
        for bad_ref in ("127.0.0.1:1/none:v1", "not a ref", upstream_registry.pushed["small"]):
            with pytest.raises(ContentNotFound):
                await store.resolve_tag(bad_ref)

    # the blob file exists on disk, but not in this namespace: never served
    async with open_containerd(sock, "default") as other:
        store = ContainerdContentStore(other, str(containerd_instance.content_path))
        assert containerd_instance.has_blob(multi.top_digest)
        with pytest.raises(ContentNotFound):
            await store.describe(multi.top_digest)
        with pytest.raises(ContentNotFound):
            async with store.open(multi.top_digest):
                pass
        with pytest.raises(NotFound):
            await other.content_info(multi.top_digest)


async def test_events_advertise_pulls_and_withdraw_deletes_keeping_shared_content(
    containerd_instance: Containerd, upstream_registry: Upstream, test_images: ImageSet
) -> None:
    cri = CriClient(containerd_instance.socket)
    small = upstream_registry.pushed["small"]
    shared = upstream_registry.push(test_images.small, repo="e2e/small-shared", tag="v1")
    small_keys = expected_keys(test_images.small, small)
    router = RecordingRouter()
    async with (
        open_containerd(str(containerd_instance.socket), NS) as client,
        running_tracker(client, router) as tracker,
    ):
        assert router.keys == set()
        await pull(cri, small)
        await wait_until(lambda: small_keys <= router.keys, "the pulled image to be advertised")
        await pull(cri, shared)  # same content under a second name
        await wait_until(lambda: shared in router.keys, "the second tag")
        listed = {i["name"]: i for i in (img.as_dict() for img in tracker.advertised_images())}
        assert listed[shared]["tag_key"] == shared
        assert set(listed[shared]["digests"]) == small_keys - {small}  # type: ignore[arg-type]

        # delete the first image's records: its tag goes, the shared content stays
        digest_name = small.rsplit(":", 1)[0] + "@" + test_images.small.top_digest
        await ctr_rm(containerd_instance, small, digest_name)
        await wait_until(lambda: small not in router.keys, "the tag to be withdrawn")
        assert router.keys == (small_keys - {small}) | {shared}
        assert tracker.statistics()["events"] >= 4

        # delete every remaining record: everything is withdrawn
        images = await client.list_images()
        await ctr_rm(containerd_instance, *(i.name for i in images))
        await wait_until(lambda: not router.keys, "every key to be withdrawn")
        assert tracker.advertised_images() == []
        assert tracker.statistics()["keys"] == 0


async def test_restart_of_containerd_resubscribes_and_resyncs(
    containerd_instance: Containerd, upstream_registry: Upstream, test_images: ImageSet
) -> None:
    cri = CriClient(containerd_instance.socket)
    await pull(cri, upstream_registry.pushed["small"])
    router = RecordingRouter()
    async with (
        open_containerd(str(containerd_instance.socket), NS) as client,
        running_tracker(client, router) as tracker,
    ):
        before = set(router.keys)
        assert before == expected_keys(test_images.small, upstream_registry.pushed["small"])
        await trio.to_thread.run_sync(containerd_instance.restart)
        await wait_until(lambda: tracker.statistics()["syncs"] == 2, "a resync after restart")
        assert tracker.statistics()["reconnects"] >= 1 and router.keys == before
        # events flow again on the new subscription
        docker = upstream_registry.pushed["docker"]
        await pull(cri, docker)
        want = before | expected_keys(test_images.docker, docker)
        await wait_until(lambda: router.keys == want, "the image pulled after the restart")


async def test_calls_are_cancellable_and_abandoned_streams_do_not_leak(
    containerd_instance: Containerd, tmp_path: Path
) -> None:
    image = build_large(tmp_path / "img", 15, name="cancel")  # 3 MiB layers: several messages
    archive = tmp_path / "cancel.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(image.path, arcname=".")
    argv = containerd_instance.ctr("-n", NS, "images", "import", "--no-unpack",
                                   "--index-name", "cancel.test/big:v1", str(archive))  # fmt: skip
    await trio.to_thread.run_sync(lambda: subprocess.run(argv, check=True, capture_output=True))
    layer = image.manifests[0].layers[0]
    async with open_containerd(str(containerd_instance.socket), NS) as client:
        with trio.CancelScope() as scope:
            scope.cancel()
            await client.version()
        assert scope.cancelled_caught
        store = ContainerdContentStore(client, direct_reads=False)
        for _ in range(20):  # abandon streams: after a break, and on cancellation
            async with client.read_content(layer.digest) as chunks:
                async for _chunk in chunks:
                    break
            async with store.open(layer.digest) as reader:
                async for _chunk in reader.read(0, reader.size):
                    break
            with trio.move_on_after(0.001):
                async with client.subscribe() as events:
                    async for _env in events:
                        pass
        # the connection is still healthy and reads the whole blob correctly
        async with store.open(layer.digest) as reader:
            data = b"".join([c async for c in reader.read(0, reader.size)])
        assert len(data) == layer.size > 2 * 1024 * 1024
        assert hashlib.sha256(data).hexdigest() == layer.digest.split(":")[1]


async def test_content_info_once_per_blob_request_and_deleted_content_is_noticed(
    containerd_instance: Containerd, upstream_registry: Upstream, test_images: ImageSet
) -> None:
    cri = CriClient(containerd_instance.socket)
    await pull(cri, upstream_registry.pushed["big"])
    layers = [layer.digest for layer in test_images.large.for_platform().layers]
    async with open_containerd(str(containerd_instance.socket), NS) as client:
        store = ContainerdContentStore(client, str(containerd_instance.content_path))
        calls: list[str] = []
        ask = client.content_info

        async def counting_info(digest: str) -> object:
            calls.append(digest)
            return await ask(digest)

        client.content_info = counting_info  # type: ignore[method-assign]
        # what a blob GET does: describe, then open (one Info between them)
        desc = await store.describe(layers[0])
        async with store.open(layers[0]) as reader:
            assert reader.size == desc.size
        assert calls == [layers[0]]
        # concurrent requests for one digest share one Info call
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(store.describe, layers[1])
        assert calls.count(layers[1]) == 1
        # deleted (and its file collected) while its size was remembered: open asks again
        for digest in layers[:2]:
            await trio.run_process(
                containerd_instance.ctr("-n", NS, "content", "rm", digest),
                capture_stdout=True,
            )  # fmt: skip
        containerd_instance.blob_path(layers[0]).unlink(missing_ok=True)  # what GC does
        with pytest.raises(ContentNotFound):
            async with store.open(layers[0]):
                pass
        # deleted, file still there: trusted for SIZE_TTL at most
        await trio.sleep(SIZE_TTL)
        with pytest.raises(ContentNotFound):
            await store.describe(layers[1])
