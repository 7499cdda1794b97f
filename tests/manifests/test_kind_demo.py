"""Checks of hack/kind-demo.sh, which needs Docker and kind and so cannot run here.

Why: the script is the first thing a user with kind tries; it must stay shellcheck-clean, keep the
containerd settings spegla depends on, and replace the image placeholder the manifests really use.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "hack" / "kind-demo.sh"


def test_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_script_is_shellcheck_clean() -> None:
    result = subprocess.run(
        ["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout


def test_containerd_is_patched_for_spegla() -> None:
    text = SCRIPT.read_text()
    assert 'config_path = "/etc/containerd/certs.d"' in text
    assert "discard_unpacked_layers = false" in text
    assert text.count("- role: worker") == 2 and text.count("- role: control-plane") == 1


def test_image_placeholder_is_the_one_the_manifests_use() -> None:
    placeholder = re.search(r's#([^#]+)#\$IMAGE#g', SCRIPT.read_text())
    assert placeholder is not None
    images = set(re.findall(r"image: (\S+)", (ROOT / "manifests/base/daemonset.yaml").read_text()))
    assert images == {placeholder.group(1)}
