"""Run Python code with its sockets inside a network namespace, without a subprocess.

Why: every connection to a node address must be made from inside a namespace (the root namespace
routes to the outside).  ``setns(CLONE_NEWNET)`` changes the namespace of the calling *thread* only,
and a socket keeps the namespace it was created in, so a short-lived thread that enters the
namespace and then runs the given function makes all of that function's connections from there.

API
- ``call_in_netns(netns, fn, *args)`` -> fn's result (exceptions propagate); ``netns=None`` runs fn
  in the current thread (root namespace, for loopback use).
- ``http_get(url, netns=None, timeout=5.0, headers=None)`` -> ``(status, headers, body)``.
- ``wait_http(url, netns=None, timeout=10.0)``: poll until the URL answers any HTTP status.
"""

from __future__ import annotations

import ctypes
import http.client
import os
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _enter(netns: str) -> None:
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({netns}): {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in_netns(netns: str | None, fn: Callable[..., T], *args: object) -> T:
    if netns is None:
        return fn(*args)
    box: dict[str, object] = {}

    def run() -> None:
        try:
            _enter(netns)
            box["value"] = fn(*args)
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=run, name=f"netns-{netns}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def _get(
    url: str, timeout: float, headers: dict[str, str] | None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname or "", u.port or 80, timeout=timeout)
    try:
        path = u.path + (f"?{u.query}" if u.query else "")
        conn.request(method, path or "/", headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def http_get(
    url: str,
    netns: str | None = None,
    timeout: float = 5.0,
    headers: dict[str, str] | None = None,
    method: str = "GET",
) -> tuple[int, dict[str, str], bytes]:
    return call_in_netns(netns, _get, url, timeout, headers, method)


def wait_http(url: str, netns: str | None = None, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return http_get(url, netns, timeout=1.0)[0]
        except OSError as e:
            last = e
            time.sleep(0.02)
    raise TimeoutError(f"{url} (netns {netns}) not answering after {timeout}s: {last}")
