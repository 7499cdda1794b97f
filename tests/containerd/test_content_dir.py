"""The content directory is looked for again until containerd has created it, and a digest with no
file in it is not found without a Content.Info call (no containerd needed: the directory is
configured)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import trio
import trio.testing

from agent.containerd import ContainerdClient, NotFound
from agent.content_store import RECHECK_DIR, ContainerdContentStore
from registry.interfaces import ContentNotFound


async def test_a_content_dir_created_after_start_is_used(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    client = cast(ContainerdClient, cast(Any, object()))  # never called: the path is configured
    store = ContainerdContentStore(client, str(tmp_path))
    assert await store.content_dir() is None  # fresh node: no blobs/ yet
    (tmp_path / "blobs").mkdir()
    assert await store.content_dir() is None  # not looked at again at once
    await trio.sleep(RECHECK_DIR)
    assert await store.content_dir() == str(tmp_path)
    (tmp_path / "blobs").rmdir()
    assert await store.content_dir() == str(tmp_path)  # once found, kept


async def test_without_direct_reads_it_is_never_looked_for(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    (tmp_path / "blobs").mkdir()
    client = cast(ContainerdClient, cast(Any, object()))
    store = ContainerdContentStore(client, str(tmp_path), direct_reads=False)
    assert await store.content_dir() is None
    await trio.sleep(RECHECK_DIR)
    assert await store.content_dir() is None


async def test_opening_content_looks_for_the_dir_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    client = cast(ContainerdClient, cast(Any, object()))
    store = ContainerdContentStore(client, str(tmp_path))
    assert await store.content_dir() is None
    (tmp_path / "blobs").mkdir()
    assert await store.content_dir(look_now=True) == str(tmp_path)


class CountingInfo:
    """A containerd client whose Content.Info knows one blob and counts the calls."""

    def __init__(self, digest: str, size: int) -> None:
        self.digest, self.size, self.calls = digest, size, 0

    async def content_info(self, digest: str) -> Any:
        self.calls += 1
        if digest != self.digest:
            raise NotFound(digest)
        return SimpleNamespace(size=self.size)


async def test_a_digest_without_a_blob_file_is_not_found_without_asking_containerd(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    present, absent = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    blobs = tmp_path / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (blobs / ("a" * 64)).write_bytes(b"x" * 10)
    info = CountingInfo(present, 10)
    store = ContainerdContentStore(cast(ContainerdClient, cast(Any, info)), str(tmp_path))
    assert await store.content_dir(look_now=True) == str(tmp_path)
    assert (await store.describe(present)).size == 10
    assert info.calls == 1
    for _ in range(3):
        with pytest.raises(ContentNotFound):
            await store.describe(absent)
    assert info.calls == 1  # a stat answered, not Content.Info
    (blobs / ("b" * 64)).write_bytes(b"y" * 5)  # a file appeared (committed, maybe elsewhere)
    with pytest.raises(ContentNotFound):
        await store.describe(absent)
    assert info.calls == 2  # with a file there, containerd has the last word (not in ours)
