"""Unit tests of the state tracker's pure parts and its event handling, over in-memory fakes."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from agent.advertising.state import StateTracker
from agent.containerd.client import (
    ContentEvent,
    Descriptor,
    Envelope,
    Image,
    ImageEvent,
    decode_event,
    event_filters,
)
from agent.containerd.image_walk import (
    AdvertisedImage,
    ChildrenCache,
    KeyCounts,
    children,
    gauge_values,
    source_registries,
    walk,
)
from agent.proto import containerd_content_events_pb2, containerd_images_pb2
from registry.oci.filters import ReferenceFilter
from registry.oci.mediatypes import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from tests.agent.containerd.fakes import FakeContent, RecordingRouter

D1, D2, D3 = ("sha256:" + c * 64 for c in "123")


def tracker(fake: FakeContent, router: RecordingRouter, **kw: Any) -> StateTracker:
    return StateTracker(fake, router, **kw)  # type: ignore[arg-type]


def test_children_of_index_and_manifest() -> None:
    index = json.dumps(
        {
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": D1, "size": 5},
                {"digest": "sha256:short"},
                "junk",
            ]
        }
    ).encode()
    assert children(OCI_INDEX, index) == [Descriptor(D1, 5, OCI_MANIFEST)]
    manifest = json.dumps(
        {
            "config": {"mediaType": "c", "digest": D2, "size": 2},
            "layers": [{"mediaType": "l", "digest": D3, "size": 3}],
        }
    ).encode()
    assert children(DOCKER_MANIFEST, manifest) == [Descriptor(D2, 2, "c"), Descriptor(D3, 3, "l")]
    assert children(OCI_MANIFEST, b"\x1f\x8b not json") == []
    assert children(OCI_MANIFEST, b"[1, 2]") == []
    assert children("application/octet-stream", manifest) == []


async def test_walk_skips_missing_platforms_and_layers() -> None:
    fake = FakeContent()
    amd = fake.add_image(b"amd", OCI_MANIFEST, seed="amd")
    arm = fake.add_image(b"arm", OCI_MANIFEST, seed="arm")
    index = fake.add_index([amd, arm])
    arm_children = children(OCI_MANIFEST, fake.blobs[arm.digest])
    for d in [arm.digest, *(c.digest for c in arm_children)]:
        del fake.blobs[d]  # only the amd64 platform was pulled
    amd_children = children(OCI_MANIFEST, fake.blobs[amd.digest])
    del fake.blobs[amd_children[-1].digest]  # and one of its layers was discarded

    found = await walk(fake, index)
    assert found == {index.digest, amd.digest, *(c.digest for c in amd_children[:-1])}


async def test_walk_of_missing_root_is_empty_and_cache_is_used() -> None:
    fake = FakeContent()
    m = fake.add_image(b"x", OCI_MANIFEST)
    cache = ChildrenCache()
    first = await walk(fake, m, cache)
    assert cache.get(m.digest) is not None
    fake.blobs[m.digest] = b"garbage"  # a cached walk does not read the manifest again
    assert await walk(fake, m, cache) == first
    assert await walk(fake, Descriptor(D1, 1, OCI_MANIFEST)) == frozenset()


def test_key_counts_report_first_and_last_reference() -> None:
    counts = KeyCounts()
    assert counts.change((), {"a", "b"}) == ({"a", "b"}, set())
    assert counts.change((), {"b", "c"}) == ({"c"}, set())
    assert counts.change({"a", "b"}, ()) == (set(), {"a"})
    assert counts.change({"b", "c"}, {"c"}) == (set(), {"b"})
    assert counts.keys() == {"c"}


def test_gauge_values_count_images_once() -> None:
    tagged = AdvertisedImage("r.io/a:1", "r.io", "a", "r.io/a:1", D1, frozenset({D1, D2}))
    same = AdvertisedImage(f"r.io/a@{D1}", "r.io", "a", None, D1, frozenset({D1, D2}))
    other = AdvertisedImage(f"q.io/b@{D3}", "q.io", "b", None, D3, frozenset({D3}))
    values = gauge_values([tagged, same, other], {D2: frozenset({"q.io"})})
    assert values["r.io"] == {
        "images": 1,
        "keys": 3,
        "image_tags": 1,
        "image_digests": 0,
        "content_digests": 2,
    }
    assert values["q.io"] == {
        "images": 1,
        "keys": 2,
        "image_tags": 0,
        "image_digests": 1,
        "content_digests": 2,
    }


def envelope(topic: str, payload: bytes, type_url: str) -> Envelope:
    return Envelope("k8s.io", topic, type_url, payload, 0.0)


def test_decode_events_of_containerd_16_and_2x() -> None:
    create = containerd_images_pb2.ImageCreate(name="r.io/a:1").SerializeToString()
    for type_url in ("containerd.services.images.v1.ImageCreate", "containerd.events.ImageCreate"):
        assert decode_event(envelope("/images/create", create, type_url)) == ImageEvent(
            "create", "r.io/a:1"
        )
    delete = containerd_images_pb2.ImageDelete(name="r.io/a:1").SerializeToString()
    assert decode_event(envelope("/images/delete", delete, "x.ImageDelete")) == ImageEvent(
        "delete", "r.io/a:1"
    )
    content = containerd_content_events_pb2.ContentCreate(digest=D1, size=3).SerializeToString()
    assert decode_event(
        envelope("/content/create", content, "containerd.events.ContentCreate")
    ) == (ContentEvent("create", D1))
    assert decode_event(envelope("/content/create", b"\xff\xff", "x")) is None
    bad = containerd_content_events_pb2.ContentDelete(digest="nope").SerializeToString()
    assert decode_event(envelope("/content/delete", bad, "x")) is None
    assert decode_event(envelope("/snapshot/prepare", b"", "x")) is None
    assert all('namespace=="k8s.io"' in f for f in event_filters("k8s.io"))


def test_source_registries_apply_filters() -> None:
    labels = {
        "containerd.io/distribution.source.docker.io": "library/nginx,library/x",
        "containerd.io/distribution.source.ghcr.io": "org/app",
        "containerd.io/uncompressed": D2,
    }
    assert source_registries(labels, D1, None) == {"docker.io", "ghcr.io"}
    only_ghcr = ReferenceFilter.from_config(["https://ghcr.io"])
    assert source_registries(labels, D1, only_ghcr) == {"ghcr.io"}
    assert source_registries({}, D1, None) == frozenset()


def gauge(name: str, registry: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"registry": registry})


async def test_tracker_sync_events_and_shared_content() -> None:
    fake, router = FakeContent(), RecordingRouter()
    m = fake.add_image(b"one", OCI_MANIFEST, seed="s")
    fake.tag("reg.test/app:v1", m)
    fake.tag(f"reg.test/app@{m.digest}", m)
    fake.tag(m.digest, m)  # the image id record is never advertised by itself
    t = tracker(fake, router)
    await t.sync()
    digests = await walk(fake, m)
    assert router.keys == {*digests, "reg.test/app:v1"}
    assert gauge("spegel_advertised_images", "reg.test") == 1
    assert gauge("spegel_advertised_keys", "reg.test") == len(digests) + 1

    # a second image sharing the content; deleting the first keeps the shared digests
    fake.tag("reg.test/copy:v2", m)
    name_payload = containerd_images_pb2.ImageCreate(name="reg.test/copy:v2").SerializeToString()
    await t.handle(envelope("/images/create", name_payload, "x"))
    assert "reg.test/copy:v2" in router.keys
    for name in ("reg.test/app:v1", f"reg.test/app@{m.digest}"):
        del fake.images[name]
        payload = containerd_images_pb2.ImageDelete(name=name).SerializeToString()
        await t.handle(envelope("/images/delete", payload, "x"))
    assert router.keys == {*digests, "reg.test/copy:v2"}
    assert gauge("spegel_advertised_image_tags", "reg.test") == 1

    del fake.images["reg.test/copy:v2"]
    payload = containerd_images_pb2.ImageDelete(name="reg.test/copy:v2").SerializeToString()
    await t.handle(envelope("/images/delete", payload, "x"))
    assert router.keys == set()
    assert gauge("spegel_advertised_images", "reg.test") is None


async def test_tracker_filters_and_refresh_withdraws_vanished_content() -> None:
    fake, router = FakeContent(), RecordingRouter()
    m = fake.add_image(b"a", OCI_MANIFEST, seed="a")
    fake.tag("keep.test/a:v1", m)
    fake.tag("drop.test/b:v1", fake.add_image(b"b", OCI_MANIFEST, seed="b"))
    fake.tag("keep.test/c:latest", fake.add_image(b"c", OCI_MANIFEST, seed="c"))
    filters = ReferenceFilter.from_config(["http://keep.test"], [":latest$"])
    t = tracker(fake, router, filters=filters)
    await t.sync()
    assert {k for k in router.keys if not k.startswith("sha256:")} == {"keep.test/a:v1"}
    assert router.keys == {*await walk(fake, m), "keep.test/a:v1"}

    layer = children(OCI_MANIFEST, fake.blobs[m.digest])[-1].digest
    del fake.blobs[layer]  # garbage-collected or discarded behind our back
    await t.sync()
    assert layer not in router.keys
    assert router.calls[-1] == ("withdraw", (layer,))


async def test_content_create_waits_for_source_label(autojump_clock: object) -> None:
    fake, router = FakeContent(), RecordingRouter()
    t = tracker(fake, router, filters=ReferenceFilter.from_config(["https://ok.test"]))
    blob = fake.add(b"layer bytes")
    payload = containerd_content_events_pb2.ContentCreate(digest=blob).SerializeToString()
    # no label yet: retried a bounded number of times, then given up
    await t.handle(envelope("/content/create", payload, "containerd.events.ContentCreate"))
    assert router.keys == set()
    fake.labels[blob] = {"containerd.io/distribution.source.ok.test": "team/app"}
    await t.handle(envelope("/content/create", payload, "containerd.events.ContentCreate"))
    assert router.keys == {blob}
    other = fake.add(b"other", {"containerd.io/distribution.source.no.test": "x/y"})
    payload = containerd_content_events_pb2.ContentCreate(digest=other).SerializeToString()
    await t.handle(envelope("/content/create", payload, "x"))
    assert other not in router.keys  # registry not mirrored

    # an image arriving later takes the digest over; deleting content withdraws it
    del fake.blobs[blob]
    payload = containerd_content_events_pb2.ContentDelete(digest=blob).SerializeToString()
    await t.handle(envelope("/content/delete", payload, "containerd.events.ContentDelete"))
    assert router.keys == set()


def test_tracker_rejects_bad_interval() -> None:
    with pytest.raises(ValueError):
        tracker(FakeContent(), RecordingRouter(), refresh_interval=0)


def test_image_record_without_registry_is_skipped() -> None:
    from agent.containerd.image_walk import parse_record

    target = Descriptor(D1, 1, OCI_MANIFEST)
    assert parse_record(Image("sha256:" + "a" * 64, target), None) is None
    assert parse_record(Image("library/nginx:1", target), None) is None  # no registry host
    ref = parse_record(Image("r.io/x/y:1", target), None)
    assert ref is not None and ref.tag_key == "r.io/x/y:1"


async def test_run_retries_with_backoff_until_containerd_answers(autojump_clock: object) -> None:
    fake, router = FakeContent(), RecordingRouter()
    m = fake.add_image(b"r", OCI_MANIFEST, seed="r")
    fake.tag("reg.test/r:v1", m)
    fake.down = True
    t = tracker(fake, router, backoff_initial=1, backoff_max=4, operation_timeout=30)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(t.run)
        await trio.sleep(20)  # down: 1 + 2 + 4 + 4 + 4 + ... seconds between attempts
        assert not t.synced.is_set() and t.statistics()["reconnects"] >= 4
        fake.down, fake.hang_listing = False, True  # up, but wedged: the sync times out
        await trio.sleep(60)
        assert not t.synced.is_set()
        assert "did not answer" in str(t.statistics()["last_error"])
        fake.hang_listing = False
        await t.synced.wait()
        assert "reg.test/r:v1" in router.keys and t.statistics()["connected"]
        nursery.cancel_scope.cancel()


async def test_run_follows_events_and_refreshes_on_timer(autojump_clock: object) -> None:
    fake, router = FakeContent(), RecordingRouter()
    send, fake.events = trio.open_memory_channel[Envelope](10)
    t = tracker(fake, router, refresh_interval=60)
    async with trio.open_nursery() as nursery:
        await nursery.start(t.run)
        assert router.keys == set() and t.statistics()["syncs"] == 1
        m = fake.add_image(b"e", OCI_MANIFEST, seed="e")
        fake.tag("reg.test/e:v1", m)
        payload = containerd_images_pb2.ImageCreate(name="reg.test/e:v1").SerializeToString()
        await send.send(envelope("/images/create", payload, "x"))
        await trio.sleep(1)
        assert "reg.test/e:v1" in router.keys and t.statistics()["syncs"] == 1
        del fake.images["reg.test/e:v1"]  # deleted without an event: the refresh notices
        await trio.sleep(60)
        assert router.keys == set() and t.statistics()["syncs"] == 2
        await send.aclose()  # the stream ends: reconnect and resync
        fake.events = None  # the next subscription stays open
        await trio.sleep(5)
        assert t.statistics()["reconnects"] == 1 and t.statistics()["syncs"] >= 3
        nursery.cancel_scope.cancel()


@given(
    st.lists(
        st.tuples(st.integers(0, 4), st.frozensets(st.sampled_from("abcdefg"), max_size=4)),
        max_size=40,
    )
)
def test_key_counts_match_the_union_of_contributors(ops: list[tuple[int, frozenset[str]]]) -> None:
    counts = KeyCounts()
    current: dict[int, frozenset[str]] = {}
    advertised: set[str] = set()
    for who, keys in ops:
        before = set().union(*current.values())
        added, removed = counts.change(current.get(who, frozenset()), keys)
        current[who] = keys
        after = set().union(*current.values())
        assert (added, removed) == (after - before, before - after)
        advertised = (advertised | added) - removed
        assert advertised == after == counts.keys()


async def test_sync_repairs_router_calls_that_failed() -> None:
    class FlakyRouter(RecordingRouter):
        failures = 1

        async def advertise(self, keys: Iterable[str]) -> None:
            if self.failures:
                self.failures -= 1
                raise RuntimeError("DHT hiccup")
            await super().advertise(keys)

    fake, router = FakeContent(), FlakyRouter()
    t = tracker(fake, router)
    await t.sync()
    fake.tag("reg.test/f:v1", fake.add_image(b"f", OCI_MANIFEST, seed="f"))
    payload = containerd_images_pb2.ImageCreate(name="reg.test/f:v1").SerializeToString()
    with pytest.raises(RuntimeError):
        await t.handle(envelope("/images/create", payload, "x"))
    assert router.keys == set()
    await t.sync()  # the tracker knew the image already; the router is told now
    assert "reg.test/f:v1" in router.keys and len(router.keys) == len(t.keys()) == 5
