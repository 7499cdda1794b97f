"""Offline builder for real OCI test images with reproducible digests.

Why: every real-component test needs images that containerd can pull and unpack, without internet,
and with digests that are the same on every run so tests can assert on them.  Layers are real PAX
tar files (mtime 0, root-owned) filled with seeded random bytes and gzipped with mtime 0, so the
same parameters always give the same bytes.

API
- ``build_small(dest, name="small")`` -> ``BuiltImage``: OCI image, 2 layers, ~1 MiB.
- ``build_multi(dest, name="multi")`` -> ``BuiltImage``: OCI index, linux/amd64 + linux/arm64/v8.
- ``build_docker(dest, name="docker")`` -> ``BuiltImage``: Docker v2s2 variant (its own
  layers), converted offline with ``skopeo copy --format v2s2`` into a ``dir:`` layout
  (``BuiltImage.transport`` says which skopeo transport to push from).
- ``build_large(dest, size_mib, name="big")`` -> ``BuiltImage``: 5 layers, ``size_mib`` MiB.
- ``build_test_set(dest, large_mib=4)`` -> ``TestImages``: all of the above (cached per dir).
- ``BuiltImage.top_digest`` is what a tag resolves to (manifest or index); ``.manifests`` lists
  every platform manifest with its config and layer descriptors; ``.blob_digests()`` (config +
  layers of the host platform, or all platforms) is what a node fetches as blobs;
  ``.manifest_digests()`` what it fetches from /manifests/ by digest.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import shutil
import subprocess
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from registry.interfaces import Descriptor
from registry.oci.reference import sha256_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"

KIB = 1024
MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def as_dict(self) -> dict[str, str]:
        d = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            d["variant"] = self.variant
        return d


@dataclass(frozen=True, slots=True)
class ManifestInfo:
    """One image manifest (one platform): its own descriptor, its config and its layers."""

    descriptor: Descriptor
    platform: Platform
    config: Descriptor
    layers: tuple[Descriptor, ...]

    def blob_digests(self) -> tuple[str, ...]:
        return (self.config.digest, *(layer.digest for layer in self.layers))


@dataclass(frozen=True, slots=True)
class BuiltImage:
    """An image on disk, ready to push with skopeo from ``f"{transport}:{path}..."``."""

    name: str
    tag: str
    path: Path
    transport: str  # "oci" (layout dir, reference by tag) or "dir" (skopeo dir layout)
    top: Descriptor  # what the tag resolves to: a manifest or an index
    manifests: tuple[ManifestInfo, ...]

    @property
    def top_digest(self) -> str:
        return self.top.digest

    @property
    def is_index(self) -> bool:
        return self.top.media_type == OCI_INDEX

    @property
    def skopeo_source(self) -> str:
        return f"oci:{self.path}:{self.tag}" if self.transport == "oci" else f"dir:{self.path}"

    def for_platform(self, architecture: str = "amd64") -> ManifestInfo:
        for m in self.manifests:
            if m.platform.architecture == architecture:
                return m
        raise KeyError(f"{self.name}: no manifest for {architecture}")

    def blob_digests(self, architecture: str | None = "amd64") -> tuple[str, ...]:
        """Config + layer digests of one platform (default amd64), or of all with ``None``."""
        if architecture is None:
            return tuple(d for m in self.manifests for d in m.blob_digests())
        return self.for_platform(architecture).blob_digests()

    def manifest_digests(self, architecture: str = "amd64") -> tuple[str, ...]:
        """Digests a node GETs from /manifests/ when pulling (index first, then its platform)."""
        m = self.for_platform(architecture)
        if self.is_index:
            return (self.top.digest, m.descriptor.digest)
        return (m.descriptor.digest,)

    @property
    def total_size(self) -> int:
        return sum(layer.size for m in self.manifests for layer in m.layers)

    def read(self, digest: str) -> bytes:
        """The exact bytes of one of this image's blobs (manifests and index included)."""
        hex_digest = digest.removeprefix("sha256:")
        if self.transport == "oci":
            return (self.path / "blobs" / "sha256" / hex_digest).read_bytes()
        if digest == self.top.digest:  # skopeo's dir layout keeps the manifest by name
            return (self.path / "manifest.json").read_bytes()
        return (self.path / hex_digest).read_bytes()


@dataclass(frozen=True, slots=True)
class TestImages:
    __test__ = False  # not a pytest test class, despite the name

    small: BuiltImage
    multi: BuiltImage
    docker: BuiltImage
    large: BuiltImage
    all: tuple[BuiltImage, ...] = field(default=())


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class _Layout:
    """Writes blobs into an OCI image layout directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (path / "oci-layout").write_bytes(_canonical({"imageLayoutVersion": "1.0.0"}))

    def put(self, media_type: str, data: bytes) -> Descriptor:
        digest = sha256_digest(data)
        blob = self.path / "blobs" / "sha256" / digest.removeprefix("sha256:")
        if not blob.exists():
            blob.write_bytes(data)
        return Descriptor(digest, len(data), media_type)

    def finish(self, tag: str, top: Descriptor) -> None:
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": top.media_type,
                    "digest": top.digest,
                    "size": top.size,
                    "annotations": {"org.opencontainers.image.ref.name": tag},
                }
            ],
        }
        (self.path / "index.json").write_bytes(_canonical(index))


def make_layer(seed: str, file_sizes: list[int]) -> tuple[bytes, str]:
    """A gzipped PAX tar holding one file per size with seeded random content.

    Returns (compressed bytes, diff_id of the uncompressed tar).
    """
    rng = random.Random(seed)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        d = tarfile.TarInfo("data")
        d.type = tarfile.DIRTYPE
        d.mode = 0o755
        d.mtime = 0
        tar.addfile(d)
        for i, size in enumerate(file_sizes):
            info = tarfile.TarInfo(f"data/{seed.replace('/', '_')}-{i}.bin")
            info.size = size
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(rng.randbytes(size)))
    tar_bytes = raw.getvalue()
    # random data does not compress: level 1 is as good as 9 and much faster
    return gzip.compress(tar_bytes, compresslevel=1, mtime=0), sha256_digest(tar_bytes)


def _write_manifest(
    layout: _Layout, seed: str, platform: Platform, layer_files: list[list[int]]
) -> ManifestInfo:
    layers: list[Descriptor] = []
    diff_ids: list[str] = []
    for i, files in enumerate(layer_files):
        gz, diff_id = make_layer(f"{seed}/{platform.architecture}/{i}", files)
        layers.append(layout.put(OCI_LAYER, gz))
        diff_ids.append(diff_id)
    config = {
        **platform.as_dict(),
        "created": "1970-01-01T00:00:00Z",
        "config": {"Cmd": ["/bin/true"], "Labels": {"spegla.test": seed}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": f"spegla test {seed}"}],
    }
    cfg = layout.put(OCI_CONFIG, _canonical(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": cfg.media_type, "digest": cfg.digest, "size": cfg.size},
        "layers": [{"mediaType": x.media_type, "digest": x.digest, "size": x.size} for x in layers],
    }
    desc = layout.put(OCI_MANIFEST, _canonical(manifest))
    return ManifestInfo(desc, platform, cfg, tuple(layers))


AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64", "v8")

_lock = threading.Lock()
_cache: dict[tuple[str, ...], BuiltImage] = {}


def _cached(key: tuple[str, ...], build: object) -> BuiltImage:
    with _lock:
        if key not in _cache:
            assert callable(build)
            _cache[key] = build()
        return _cache[key]


def _single(dest: Path, name: str, tag: str, layer_files: list[list[int]]) -> BuiltImage:
    path = dest / name
    shutil.rmtree(path, ignore_errors=True)
    layout = _Layout(path)
    m = _write_manifest(layout, name, AMD64, layer_files)
    layout.finish(tag, m.descriptor)
    return BuiltImage(name, tag, path, "oci", m.descriptor, (m,))


def build_small(dest: Path, name: str = "small", tag: str = "v1") -> BuiltImage:
    """2 layers (~600 KiB + ~400 KiB) + config, linux/amd64."""
    files = [[400 * KIB, 200 * KIB], [400 * KIB]]
    return _cached(("small", str(dest), name, tag), lambda: _single(dest, name, tag, files))


def build_large(dest: Path, size_mib: int, name: str = "big", tag: str = "v1") -> BuiltImage:
    """5 layers that together hold ``size_mib`` MiB of incompressible data (linux/amd64)."""
    if size_mib < 1:
        raise ValueError("size_mib must be >= 1")
    total = size_mib * MIB
    per = [total // 5] * 5
    per[-1] += total - sum(per)
    files = [[p] for p in per]
    return _cached(
        ("large", str(dest), name, tag, str(size_mib)), lambda: _single(dest, name, tag, files)
    )


def build_multi(dest: Path, name: str = "multi", tag: str = "v1") -> BuiltImage:
    """An OCI index with linux/amd64 and linux/arm64/v8 manifests (own layers each)."""

    def build() -> BuiltImage:
        path = dest / name
        shutil.rmtree(path, ignore_errors=True)
        layout = _Layout(path)
        ms = tuple(
            _write_manifest(layout, name, p, [[300 * KIB], [100 * KIB]]) for p in (AMD64, ARM64)
        )
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": m.descriptor.media_type,
                    "digest": m.descriptor.digest,
                    "size": m.descriptor.size,
                    "platform": m.platform.as_dict(),
                }
                for m in ms
            ],
        }
        top = layout.put(OCI_INDEX, _canonical(index))
        layout.finish(tag, top)
        return BuiltImage(name, tag, path, "oci", top, ms)

    return _cached(("multi", str(dest), name, tag), build)


def build_docker(dest: Path, name: str = "docker", tag: str = "v1") -> BuiltImage:
    """A Docker v2s2 image: built as OCI, converted offline by skopeo into a ``dir:`` layout."""

    def build() -> BuiltImage:
        src = _single(dest, f"{name}-oci", tag, [[300 * KIB], [300 * KIB]])
        out = dest / name
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(
            ["skopeo", "--insecure-policy", "copy", "-q", "--format", "v2s2",
             src.skopeo_source, f"dir:{out}"],
            check=True, capture_output=True,
        )  # fmt: skip
        raw = (out / "manifest.json").read_bytes()
        doc = json.loads(raw)
        if doc.get("mediaType") != DOCKER_MANIFEST:
            raise RuntimeError(f"skopeo did not produce a v2s2 manifest: {doc.get('mediaType')}")
        cfg = doc["config"]
        m = ManifestInfo(
            Descriptor(sha256_digest(raw), len(raw), DOCKER_MANIFEST),
            AMD64,
            Descriptor(cfg["digest"], cfg["size"], cfg["mediaType"]),
            tuple(Descriptor(x["digest"], x["size"], x["mediaType"]) for x in doc["layers"]),
        )
        return BuiltImage(name, tag, out, "dir", m.descriptor, (m,))

    return _cached(("docker", str(dest), name, tag), build)


def build_test_set(dest: Path, large_mib: int = 4) -> TestImages:
    """Everything the e2e tests use.  Same digests every run."""
    dest.mkdir(parents=True, exist_ok=True)
    small = build_small(dest)
    multi = build_multi(dest)
    docker = build_docker(dest)
    large = build_large(dest, large_mib)
    return TestImages(small, multi, docker, large, (small, multi, docker, large))
