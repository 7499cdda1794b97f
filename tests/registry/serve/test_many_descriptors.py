"""A mirror request from a process with more than 1024 open descriptors (issue 12, item 3).

`select.select` raises ValueError for descriptors >= FD_SETSIZE (1024); the peer client once
polled its socket that way, so a busy agent with a raised file limit failed mirror requests.
Here the test raises RLIMIT_NOFILE, holds 1100 descriptors open, and only then mirrors a ~1 MiB
blob through real loopback sockets: the peer connection's descriptor is then above 1024.
"""

from __future__ import annotations

import os
import resource
import socket
from collections.abc import Iterator

import pytest

from tests.fakes import MemoryNetwork
from tests.registry.conftest import StartNode
from tests.registry.mirror.test_mirror_peers import provider_and_client

HELD = 1100


@pytest.fixture
def many_descriptors() -> Iterator[list[int]]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = HELD + 512
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"hard RLIMIT_NOFILE {hard} < {wanted}: cannot hold {HELD} descriptors")
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(HELD)]
    try:
        yield held
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_mirror_with_descriptors_above_fd_setsize(
    many_descriptors: list[int], start_node: StartNode, network: MemoryNetwork
) -> None:
    probe = socket.socket()
    try:
        assert probe.fileno() >= 1024, "new descriptors must land above FD_SETSIZE"
    finally:
        probe.close()
    _, content, client = await provider_and_client(start_node, network)
    async with client.client() as http:
        blob = await http.get(f"/v2/library/app/blobs/{content.layer}?ns=docker.io")
        manifest = await http.get(f"/v2/library/app/manifests/{content.manifest}?ns=docker.io")
    assert blob.status_code == 200
    assert blob.content == content.layer_bytes
    assert manifest.status_code == 200
    assert manifest.content == content.manifest_bytes


def test_no_select_select_in_the_agent() -> None:
    """`select.select` (FD_SETSIZE-bound) appears nowhere in the shipped packages."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    offenders = []
    for package in ("agent", "dht", "registry"):
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module == "select":
                    if any(alias.name == "select" for alias in node.names):
                        offenders.append(f"{path.relative_to(root)}:{node.lineno}")
                if (
                    isinstance(node, ast.Attribute)
                    and node.attr == "select"
                    and isinstance(node.value, ast.Name)
                    and node.value.id == "select"
                ):
                    offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert offenders == []
