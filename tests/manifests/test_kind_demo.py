"""Checks of hack/kind-demo.sh, which needs Docker and kind and so cannot run here.

Why: the script is the first thing a user with kind tries; it must stay shellcheck-clean, patch the
containerd settings spegla depends on for the config version each patch names, and load the image
the manifests really use (the archive `make image` writes, applied without rewriting the manifests).
"""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "hack" / "kind-demo.sh"


def test_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_script_is_shellcheck_clean() -> None:
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def _patch_texts() -> list[str]:
    """The containerdConfigPatches of the kind cluster config the script creates."""
    text = SCRIPT.read_text()
    config = text.split("--config - <<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    patches: list[str] = yaml.safe_load(config)["containerdConfigPatches"]
    return patches


def _patches() -> list[dict[str, Any]]:
    return [tomllib.loads(patch) for patch in _patch_texts()]


def test_containerd_is_patched_for_spegla_in_both_config_versions() -> None:
    by_version = {patch["version"]: patch for patch in _patches()}
    assert sorted(by_version) == [2, 3]
    v3: Any = by_version[3]["plugins"]
    assert v3["io.containerd.cri.v1.images"]["discard_unpacked_layers"] is False
    assert v3["io.containerd.cri.v1.images"]["registry"]["config_path"] == "/etc/containerd/certs.d"
    assert "io.containerd.grpc.v1.cri" not in v3  # version 2 keys in a version 3 file are ignored
    v2: Any = by_version[2]["plugins"]["io.containerd.grpc.v1.cri"]
    assert v2["containerd"]["discard_unpacked_layers"] is False
    assert v2["registry"]["config_path"] == "/etc/containerd/certs.d"
    assert "io.containerd.cri.v1.images" not in by_version[2]["plugins"]
    text = SCRIPT.read_text()
    assert text.count("- role: worker") == 2 and text.count("- role: control-plane") == 1
    assert "v0.31.0" in text  # kind applies a versioned patch only to a config of that version


def test_the_image_make_image_builds_is_loaded_and_the_manifests_applied_as_they_are() -> None:
    text = SCRIPT.read_text()
    assert "make image" in text and 'kind load image-archive "$ARCHIVE"' in text
    assert "ARCHIVE:-build/spegla-image.tar" in text
    assert "k apply -k manifests/" in text and "sed " not in text.split("installing spegla")[1]
    (entry,) = yaml.safe_load((ROOT / "manifests/image/kustomization.yaml").read_text())["images"]
    assert f"{entry['newName']}:{entry['newTag']}" == "localhost/spegla:0.1.0"


# containerd 2.x binaries built for the tests, beside the checkout (absent: the test skips)
_CONTAINERD_2 = sorted((ROOT.parent / "shared" / "containerd").glob("2.*/containerd"))
# The settings a kind node config (containerd 2.x) carries that matter here: layers discarded, no
# registry config_path. Version 3 keys for a version 3 file, version 2 keys for a version 2 one,
# with a runtime as every real config has: containerd 2.x migrates a version 2 `containerd`
# section's discard_unpacked_layers only when that section also names runtimes.
_KIND_LIKE = {
    3: 'version = 3\n[plugins."io.containerd.cri.v1.images"]\n  discard_unpacked_layers = true\n'
    '[plugins."io.containerd.cri.v1.images".registry]\n  config_path = ""\n',
    2: 'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n'
    "  discard_unpacked_layers = true\n"
    '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n'
    '  runtime_type = "io.containerd.runc.v2"\n'
    '[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = ""\n',
}


@pytest.mark.skipif(not _CONTAINERD_2, reason="no containerd 2.x in ../shared/containerd/")
@pytest.mark.parametrize("version", [3, 2])
def test_containerd_2_reads_the_patch_for_its_config_version(version: int, tmp_path: Path) -> None:
    """containerd 2.x loads a config of `version` with the script's patch for that version (as an
    import: kind merges the patch into the file, containerd merges imports the same way) and
    `config dump` shows the settings spegla needs in the plugin containerd 2.x uses."""
    (patch_text,) = [p for p in _patch_texts() if tomllib.loads(p)["version"] == version]
    patch = tmp_path / "patch.toml"
    patch.write_text(patch_text)
    config = tmp_path / "config.toml"
    config.write_text(f"imports = ['{patch}']\n" + _KIND_LIKE[version])
    dump = subprocess.run(
        [str(_CONTAINERD_2[-1]), "--config", str(config), "config", "dump"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    images = tomllib.loads(dump)["plugins"]["io.containerd.cri.v1.images"]
    assert images["discard_unpacked_layers"] is False
    assert images["registry"]["config_path"] == "/etc/containerd/certs.d"
