#!/usr/bin/env bash
# Builds the spegla agent image with no container registry or hub involved (`make image`):
#   1. the project's wheel and its dependencies' wheels (the venv's pip, from PyPI, for CPython 3.11
#      on this architecture: the ABI of Debian 12's python3);
#   2. a Debian 12 root filesystem from Debian's packages with mmdebstrap: the `essential` variant
#      (no apt) plus python3 and libstdc++6 (greenlet, under trio-asyncio, is C++), without docs,
#      man pages, locales or apt lists;
#   3. /opt/spegla, a venv of that python3 with the wheels installed by pip run inside the root
#      filesystem (from pip's own wheel, which is not left in the image);
#   4. an OCI image assembled with umoci: one layer for Debian, one for /opt/spegla; entrypoint
#      `spegla`, user 0:0 like the DaemonSet, nothing written to the root filesystem at run time
#      (the agent writes only to --data-dir and certs.d, both mounted);
#   5. an OCI archive, build/spegla-image.tar, whose index.json names the image
#      (org.opencontainers.image.ref.name and io.containerd.image.name) so that
#      `ctr images import` and `kind load image-archive` tag it.
# The Containerfile builds the same contents for Docker/Podman users; this script is what the tests run.
#
# Environment: IMAGE (default localhost/spegla:<version>), OUT (default build/spegla-image.tar),
# APT_SOURCES (a sources.list/.sources file for mmdebstrap; default: Debian's mirrors with updates
# and security), SOURCE_DATE_EPOCH (default: the last commit's time; timestamps in the image).
# Needs root (mmdebstrap's root mode, chroot); installs mmdebstrap and umoci if they are missing.
set -euo pipefail

# Called back by mmdebstrap as a customize hook: $1 is the new root filesystem, the wheels are in
# $SPEGLA_WHEELS. Installs the venv from inside the root, so its paths and bytecode are the image's.
if [[ ${1:-} == --customize ]]; then
  root=$2
  mkdir -p "$root/tmp/spegla-wheels"
  cp "$SPEGLA_WHEELS"/*.whl "$root/tmp/spegla-wheels/"
  chroot "$root" /usr/bin/python3 -m venv --without-pip /opt/spegla
  pip_wheel=$(cd "$root/tmp/spegla-wheels" && ls pip-*.whl)
  chroot "$root" env PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    /opt/spegla/bin/python "/tmp/spegla-wheels/$pip_wheel/pip" install --quiet --no-index \
    --find-links /tmp/spegla-wheels spegla
  rm -rf "$root/tmp/spegla-wheels"
  # The asyncio twin of the Kubernetes client; spegla uses only the synchronous client.
  rm -rf "$root"/opt/spegla/lib/python3.*/site-packages/kubernetes/aio
  # Every shared library the wheels' extensions link must be in the root filesystem, and every
  # module of the agent must import (lazily imported ones too): `spegla version` alone loads few.
  unresolved=$(chroot "$root" find /opt/spegla -name '*.so*' -type f -exec ldd {} + | grep 'not found' || true)
  if [[ -n $unresolved ]]; then
    echo "build-image: libraries missing from the image:" >&2
    echo "$unresolved" >&2
    exit 1
  fi
  chroot "$root" /opt/spegla/bin/python -c '
import importlib, pkgutil
for top in ("agent", "dht", "registry"):
    for m in pkgutil.walk_packages(importlib.import_module(top).__path__, top + "."):
        if not m.name.endswith("__main__"):
            importlib.import_module(m.name)
'
  chroot "$root" /opt/spegla/bin/spegla version
  exit 0
fi

cd "$(dirname "$0")/.."
if [[ $(id -u) != 0 ]]; then
  echo "build-image: needs root (mmdebstrap root mode and chroot)" >&2
  exit 1
fi
missing=()
for p in mmdebstrap umoci; do
  command -v "$p" >/dev/null || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "build-image: installing Debian packages: ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[[ -x .venv/bin/pip ]] || bash hack/setup.sh

VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n1)
IMAGE=${IMAGE:-localhost/spegla:$VERSION}
OUT=${OUT:-build/spegla-image.tar}
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
export SOURCE_DATE_EPOCH
created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
case $(dpkg --print-architecture) in
  amd64) machine=x86_64 ;;
  arm64) machine=aarch64 ;;
  *) echo "build-image: no wheel platform known for $(dpkg --print-architecture)" >&2; exit 1 ;;
esac

mkdir -p "$(dirname "$OUT")"
work=$(mktemp -d "${TMPDIR:-/tmp}/spegla-image.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "build-image: wheels" >&2
mkdir -p "$work/src" "$work/wheels"
tar -c --exclude=__pycache__ --exclude='*.pyc' pyproject.toml README.md agent dht registry \
  | tar -x -C "$work/src"
.venv/bin/pip wheel --quiet --no-deps --wheel-dir "$work/wheels" "$work/src"
# Debian 12 has glibc 2.36: any manylinux wheel up to that runs there (pip does not infer the older
# tags from a newer one, so each is named).
platforms=(--platform "manylinux2014_$machine")
for minor in $(seq 17 36); do platforms+=(--platform "manylinux_2_${minor}_$machine"); done
.venv/bin/pip download --quiet --only-binary=:all: --dest "$work/wheels" \
  --implementation cp --python-version 3.11 --abi cp311 "${platforms[@]}" \
  "$work"/wheels/spegla-*.whl pip

echo "build-image: Debian 12 root filesystem" >&2
sources=()
[[ -n ${APT_SOURCES:-} ]] && sources=("$APT_SOURCES")
export SPEGLA_WHEELS="$work/wheels"
# The merged-usr hook sets up merged /usr itself: otherwise init-system-helpers pulls in usrmerge and
# with it all of perl.
mmdebstrap --quiet --mode=root --variant=essential --include=python3,libstdc++6 \
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/lintian/*' \
  --customize-hook="bash \"$PWD/hack/build-image.sh\" --customize \"\$1\"" \
  bookworm "$work/rootfs" "${sources[@]}"

# What a container runtime provides, and what is only a leftover of the build.
rootfs=$work/rootfs
rm -rf "${rootfs:?}"/dev/* "$rootfs"/proc/* "$rootfs"/sys/* "$rootfs"/run/* "$rootfs"/tmp/* \
  "$rootfs"/var/cache/* "$rootfs"/var/log/* "$rootfs"/var/lib/dpkg/*-old \
  "$rootfs"/etc/machine-id "$rootfs"/etc/hostname "$rootfs"/etc/resolv.conf
find "$rootfs" -newermt "@$SOURCE_DATE_EPOCH" -print0 | xargs -0r touch --no-dereference --date="@$SOURCE_DATE_EPOCH"
unpacked=$(du -sb "$rootfs" | cut -f1)
mkdir "$work/app"
mv "$rootfs/opt/spegla" "$work/app/spegla"

echo "build-image: OCI image $IMAGE" >&2
layout=$work/layout
tag=$VERSION
umoci init --layout "$layout"
umoci new --image "$layout:$tag"
# Layers are written by GNU tar (sorted, numeric owners, no atime/ctime) and added verbatim: umoci
# 0.4.7's `insert` leaves the last file unpadded and the archive without its end blocks.
add_layer() { # add_layer DIR CREATED_BY
  local names
  mapfile -t names < <(ls -A "$1")
  tar -C "$1" --sort=name --numeric-owner --format=posix \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    --mtime="@$SOURCE_DATE_EPOCH" --clamp-mtime -cf "$work/layer.tar" -- "${names[@]}"
  umoci raw add-layer --image "$layout:$tag" --history.created "$created" \
    --history.created_by "$2" "$work/layer.tar"
  rm "$work/layer.tar"
}
add_layer "$rootfs" "mmdebstrap --variant=essential --include=python3,libstdc++6 bookworm"
mkdir -p "$work/app/opt"
mv "$work/app/spegla" "$work/app/opt/spegla"
add_layer "$work/app" "spegla $VERSION and its dependencies in a venv at /opt/spegla"
umoci config --image "$layout:$tag" --created "$created" --history.created "$created" \
  --author spegla --config.user 0:0 --config.workingdir / \
  --config.env PATH=/opt/spegla/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.env LANG=C.UTF-8 --config.env PYTHONDONTWRITEBYTECODE=1 --config.env PYTHONUNBUFFERED=1 \
  --config.entrypoint spegla --config.cmd --help \
  --config.label org.opencontainers.image.title=spegla \
  --config.label "org.opencontainers.image.description=Node agent that makes every Kubernetes node a pull-only OCI registry mirror for its neighbours" \
  --config.label org.opencontainers.image.licenses=Apache-2.0 \
  --config.label "org.opencontainers.image.version=$VERSION" \
  --config.label "org.opencontainers.image.revision=$revision"
umoci gc --layout "$layout"

# umoci names the manifest by its bare tag; containerd's import wants the full reference.
python3 - "$layout/index.json" "$IMAGE" <<'EOF'
import json, sys
path, image = sys.argv[1], sys.argv[2]
index = json.load(open(path))
assert len(index["manifests"]) == 1, index
index["manifests"][0]["annotations"] = {
    "org.opencontainers.image.ref.name": image,
    "io.containerd.image.name": image,
}
with open(path, "w") as f:
    json.dump(index, f, separators=(",", ":"), sort_keys=True)
EOF
touch --date="@$SOURCE_DATE_EPOCH" "$layout/index.json"
chmod -R a+rX "$layout"
tar -C "$layout" --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" \
  -cf "$OUT.tmp" oci-layout index.json blobs
mv "$OUT.tmp" "$OUT"

archive=$(stat -c %s "$OUT")
printf 'build-image: %s -> %s: %s bytes (%s MiB, layers gzip-compressed); %s MiB unpacked\n' \
  "$IMAGE" "$OUT" "$archive" "$((archive / 1048576))" "$((unpacked / 1048576))"
