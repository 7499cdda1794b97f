#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine (run as root by `make test` and `make demo`):
# the Debian packages the real-component tests need, and a venv built from pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

# (shellcheck) the manifests' scripts are linted in `make test`; chromium: the debug page is rendered
# headless in a test; tmux: `spegla watch` is tested on a real terminal screen.
APT_PACKAGES=(containerd docker-registry skopeo iproute2 python3-venv shellcheck chromium tmux)
# `make image` (hack/build-image.sh) and its e2e test, which runs the agent from the image with runc.
APT_PACKAGES+=(mmdebstrap umoci runc)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: not root, cannot install ${missing[*]}; tests needing them will skip" >&2
  fi
fi
# The Debian containerd unit may start a system containerd; tests start their own and never use it.

PY=${PYTHON:-python3}
stamp=.venv/.stamp-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "setup: building .venv from pyproject.toml" >&2
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[dev]'
  rm -f .venv/.stamp-*
  touch "$stamp"
fi
