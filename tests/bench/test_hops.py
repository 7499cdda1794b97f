"""bench.hops' counting rule on two small modules: what is a cross-file call, and when it stops.

Why: the hop counts of issue 20 compare two layouts; the rule must count each call that starts a
frame once, never a coroutine resuming, and must see through contextlib to the real caller.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import trio

from bench.hops import Tracer, find

CALLER = """
import os
from hopspkg import callee

async def top(fd):
    await callee.work()  # one call; its two resumptions are not calls
    callee.helper()
    callee.helper()
    async with callee.opened():  # a call of `opened` through contextlib
        pass
    local()  # same file: not counted
    os.write(fd, b"x")  # the window closes here
    callee.helper()

def local():
    pass

async def respond(stream):
    await stream.send_all(b"HTTP/1.1 200 OK\\r\\ncontent-length: 4\\r\\n")
    await stream.send_all(b"\\r\\n")  # the head's end alone: the window stays open
    callee.helper()
    await stream.send_all(b"body")  # the first body byte: the window closes
    callee.helper()
"""

CALLEE = """
import contextlib
import trio

async def work():
    await trio.sleep(0)
    await trio.sleep(0)
    helper()  # same file: not counted

def helper():
    pass

@contextlib.asynccontextmanager
async def opened():
    yield
"""


@pytest.fixture
def package(tmp_path: Path) -> Iterator[ModuleType]:
    (tmp_path / "hopspkg").mkdir()
    (tmp_path / "hopspkg" / "__init__.py").write_text("")
    (tmp_path / "hopspkg" / "caller.py").write_text(CALLER)
    (tmp_path / "hopspkg" / "callee.py").write_text(CALLEE)
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module("hopspkg.caller")
    finally:
        sys.path.remove(str(tmp_path))
        for name in [n for n in sys.modules if n.split(".")[0] == "hopspkg"]:
            del sys.modules[name]


async def test_counts_started_calls_across_files_until_the_first_body_write(
    package: ModuleType, tmp_path: Path
) -> None:
    tracer = Tracer(tmp_path, "hopspkg")
    read, write = os.pipe()
    sys.setprofile(tracer.hook)
    try:
        await package.top(write)
    finally:
        sys.setprofile(None)
        os.close(read)
        os.close(write)
    assert tracer.result(listing=True) == {
        "cross_file_calls": 4,
        "distinct_edges": 1,
        "modules": 2,
        "boundary": "os.write",
        "module_list": ["hopspkg/caller.py", "hopspkg/callee.py"],
        "edges": {"hopspkg/caller.py -> hopspkg/callee.py": 4},
    }


async def test_the_window_closes_when_send_all_passes_the_head(
    package: ModuleType, tmp_path: Path
) -> None:
    tracer = Tracer(tmp_path, "hopspkg")
    left, right = trio.socket.socketpair()
    with left, right:
        sys.setprofile(tracer.hook)
        try:
            await package.respond(trio.SocketStream(left))
        finally:
            sys.setprofile(None)
    result = tracer.result(listing=False)
    assert (result["cross_file_calls"], result["boundary"]) == (1, "SocketStream.send_all")


def test_a_window_that_never_sent_a_body_byte_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="first body byte"):
        Tracer(tmp_path, "hopspkg").result(listing=False)


def test_find_falls_back_to_any_module_that_defines_the_name() -> None:
    found = find("serve_registry", ["registry.no_such_module"])
    assert found.__name__ == "serve_registry" and found.__module__.startswith("registry.")
    with pytest.raises(ImportError, match="no NoSuchName under registry"):
        find("NoSuchName", [])
