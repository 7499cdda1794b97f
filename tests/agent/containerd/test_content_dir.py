"""The content directory is looked for again until containerd has created it (no containerd needed:
the directory is configured)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import trio
import trio.testing

from agent.containerd.client import ContainerdClient
from agent.containerd.content_store import RECHECK_DIR, ContainerdContentStore


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


async def test_surely_absent_is_a_stat_of_the_content_directory(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    client = cast(ContainerdClient, cast(Any, object()))  # never called: only files are looked at
    store = ContainerdContentStore(client, str(tmp_path))
    present, absent = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    assert not store.surely_absent(absent)  # no content directory known yet: unsure
    (tmp_path / "blobs" / "sha256").mkdir(parents=True)
    (tmp_path / "blobs" / "sha256" / ("a" * 64)).write_bytes(b"x")
    assert await store.content_dir(look_now=True) == str(tmp_path)
    assert store.surely_absent(absent)
    assert not store.surely_absent(present)
    assert not store.surely_absent("sha256:../../etc/passwd")  # never a path outside blobs/
