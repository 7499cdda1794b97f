"""The containerd settings spegla needs, as copy-paste config text for each config version.

Why one module: `spegla configuration`, `spegla doctor` and the README give the same snippets, and
the keys differ by containerd line: 1.6 and 1.7 read a version-2 config (the CRI plugin
``io.containerd.grpc.v1.cri``), 2.x writes version 3 (image settings in
``io.containerd.cri.v1.images``).  On 2.1+ CRI pulls go through the transfer service, which takes
``config_path`` as ONE directory: the snippets set exactly one.  Text is rendered with tomli-w, so
any path comes out as valid TOML.
"""

from __future__ import annotations

from typing import Any

import tomli_w

CRI_V2 = "io.containerd.grpc.v1.cri"
IMAGES_V3 = "io.containerd.cri.v1.images"


def config_version_for(major: int | None) -> int:
    """The config version a containerd release writes: 2 for 1.x, 3 for 2.x (unknown: 3)."""
    return 2 if major is not None and major < 2 else 3


def _plugins(version: int, images: dict[str, Any], registry: dict[str, Any]) -> dict[str, Any]:
    if version >= 3:
        table = dict(images)
        if registry:
            table["registry"] = registry
        return {"version": 3, "plugins": {IMAGES_V3: table}}
    cri: dict[str, Any] = {}
    if images:
        cri["containerd"] = dict(images)
    if registry:
        cri["registry"] = registry
    return {"version": 2, "plugins": {CRI_V2: cri}}


def spegla_settings(version: int, certs_d: str) -> str:
    """Both settings: layers kept after unpack, hosts.toml read from `certs_d` (one directory)."""
    return tomli_w.dumps(
        _plugins(version, {"discard_unpacked_layers": False}, {"config_path": certs_d})
    )


def config_path_only(version: int, certs_d: str) -> str:
    return tomli_w.dumps(_plugins(version, {}, {"config_path": certs_d}))


def discard_only(version: int) -> str:
    return tomli_w.dumps(_plugins(version, {"discard_unpacked_layers": False}, {}))


def local_image_pull(version: int = 3) -> str:
    """2.1+: CRI pulls without the transfer service (which reads a multi-directory path too).
    The key exists only in the 2.x images plugin; a version-2 file may carry that plugin's table
    (containerd 2.x merges it), and must: a drop-in newer than its root file is refused."""
    table = {"plugins": {IMAGES_V3: {"use_local_image_pull": True}}}
    return tomli_w.dumps({"version": 3 if version >= 3 else 2, **table})
