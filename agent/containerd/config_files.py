"""The image settings containerd 2.x actually runs with, read from its config files the way it does.

Why: containerd 2.x does not report its image settings (registry ``config_path``,
``discard_unpacked_layers``, ``use_local_image_pull``) over CRI, so `spegla doctor` reads the
config files.  A guess from one file and built-in defaults is wrong on real nodes (drop-ins under
``imports``, version-2 files that 2.x migrates), so this follows containerd's own loader:

- the root file first, then every ``imports`` entry of every file read, breadth first, each file
  once; a relative entry is relative to the importing file's directory, an entry with ``*`` is a
  glob (no match: nothing), any other entry must exist (containerd refuses to start otherwise);
- each file older than version 3 is migrated alone before it is merged: the CRI plugin's
  ``registry`` table moves to ``io.containerd.cri.v1.images``;
  ``containerd.discard_unpacked_layers`` moves too, but only when that file's ``containerd`` table
  has ``runtimes`` (containerd 2.2's migration returns early without them: the value is then lost);
- later files win key by key (tables merge deeply).

Checked against ``containerd config dump`` of the 2.x binary in the tests.  The pure core
(`effective_settings`) takes the file reader and the glob as arguments; `read_settings` wires the
real file system.  Paths in the files are the host's: ``host_root`` maps them to where the host's
files are mounted (``/host`` in the DaemonSet).  Bounds: at most `MAX_FILES` files of at most
`MAX_FILE_BYTES` each.
"""

from __future__ import annotations

import glob as globmod
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

CRI_V2 = "io.containerd.grpc.v1.cri"
IMAGES_V3 = "io.containerd.cri.v1.images"
MAX_FILES = 64
MAX_FILE_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting's merged value and the file that set it last (None: no file sets it)."""

    value: Any
    source: str | None


UNSET = Setting(None, None)


@dataclass(frozen=True, slots=True)
class ImageSettings:
    """What the config files say; ``errors`` non-empty means the reading is incomplete."""

    version: int  # of the root file (containerd 2.x writes 3)
    files: tuple[str, ...]  # read, in merge order (the host's paths)
    config_path: Setting
    discard_unpacked_layers: Setting
    use_local_image_pull: Setting
    errors: tuple[str, ...] = ()


def _table(doc: Mapping[str, Any], *keys: str) -> dict[str, Any] | None:
    node: Any = doc
    for key in keys:
        node = node.get(key) if isinstance(node, Mapping) else None
    return node if isinstance(node, dict) else None


def file_version(doc: Mapping[str, Any]) -> int:
    version = doc.get("version", 1)
    return version if isinstance(version, int) and not isinstance(version, bool) else 1


def migrate(doc: dict[str, Any]) -> dict[str, Any]:
    """The plugin tables of one file in version-3 names (only what spegla's settings need)."""
    plugins = dict(_table(doc, "plugins") or {})
    version = file_version(doc)
    if version >= 3:
        return plugins
    if version < 2 and "cri" in plugins:  # version 1 used short plugin names
        plugins.setdefault(CRI_V2, plugins.pop("cri"))
    old = _table(plugins, CRI_V2)
    if old is None:
        return plugins
    images = dict(_table(plugins, IMAGES_V3) or {})
    if "registry" in old:
        images["registry"] = old["registry"]
    runtime = _table(old, "containerd") or {}
    if "runtimes" in runtime and "discard_unpacked_layers" in runtime:
        images["discard_unpacked_layers"] = runtime["discard_unpacked_layers"]
    plugins[IMAGES_V3] = images
    return plugins


def merge(into: dict[str, Any], new: Mapping[str, Any]) -> None:
    """Tables merge key by key; any other value of `new` replaces the old one."""
    for key, value in new.items():
        old = into.get(key)
        if isinstance(old, dict) and isinstance(value, Mapping):
            merge(old, value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value


def resolve_imports(
    parent: str, imports: Any, glob: Callable[[str], list[str]]
) -> tuple[list[str], list[str]]:
    """(paths, errors) for one file's ``imports`` list (host paths; globs expanded sorted)."""
    if imports is None:
        return [], []
    if not isinstance(imports, list) or not all(isinstance(i, str) for i in imports):
        return [], [f"{parent}: imports is not a list of paths"]
    out: list[str] = []
    for entry in imports:
        path = os.path.normpath(entry)
        if not os.path.isabs(path):
            path = os.path.join(os.path.dirname(parent), path)
        out += sorted(glob(path)) if "*" in path else [path]
    return out, []


def _setting(plugins: Mapping[str, Any], *keys: str) -> Any:
    node: Any = plugins.get(IMAGES_V3)
    for key in keys:
        node = node.get(key) if isinstance(node, Mapping) else None
    return node


def effective_settings(
    root: str, read: Callable[[str], str], glob: Callable[[str], list[str]]
) -> ImageSettings:
    """Read `root` and its imports with `read(path) -> text` (raises OSError) and `glob`."""
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    files: list[str] = []
    errors: list[str] = []
    version = 0
    pending, seen = [root], set()
    while pending:
        path, pending = pending[0], pending[1:]
        if path in seen:
            continue
        seen.add(path)
        if len(files) >= MAX_FILES:
            errors.append(f"more than {MAX_FILES} config files: the rest were not read")
            break
        try:
            text = read(path)
        except OSError as exc:
            errors.append(f"{path}: {exc.strerror or exc}")
            continue
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            errors.append(f"{path} is not valid TOML: {exc}")
            continue
        files.append(path)
        if not version:
            version = file_version(doc)
        plugins = migrate(doc)
        for name, keys in (
            ("config_path", ("registry", "config_path")),
            ("discard_unpacked_layers", ("discard_unpacked_layers",)),
            ("use_local_image_pull", ("use_local_image_pull",)),
        ):
            if _setting(plugins, *keys) is not None:
                sources[name] = path
        merge(merged, plugins)
        more, bad = resolve_imports(path, doc.get("imports"), glob)
        pending += more
        errors += bad

    def setting(name: str, *keys: str) -> Setting:
        value = _setting(merged, *keys)
        return Setting(value, sources.get(name)) if value is not None else UNSET

    return ImageSettings(
        version=version,
        files=tuple(files),
        config_path=setting("config_path", "registry", "config_path"),
        discard_unpacked_layers=setting("discard_unpacked_layers", "discard_unpacked_layers"),
        use_local_image_pull=setting("use_local_image_pull", "use_local_image_pull"),
        errors=tuple(errors),
    )


def read_settings(root: str, host_root: str = "") -> ImageSettings:
    """`effective_settings` on the real file system; host paths are read under `host_root`."""
    prefix = host_root.rstrip("/")

    def read(path: str) -> str:
        with open(prefix + path, "rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise OSError(f"larger than {MAX_FILE_BYTES} bytes")
        return data.decode("utf-8", errors="replace")

    def glob(pattern: str) -> list[str]:
        return [m[len(prefix) :] for m in globmod.glob(prefix + pattern)]

    return effective_settings(root, read, glob)


def split_host_path(path: str, host_root: str) -> str:
    """The host's path of a file read at `path` (``/host/etc/x`` -> ``/etc/x`` under ``/host``)."""
    prefix = host_root.rstrip("/")
    if prefix and (path == prefix or path.startswith(prefix + "/")):
        return path[len(prefix) :] or "/"
    return path
