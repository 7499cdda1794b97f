"""Static checks of hack/build-image.sh (`make image`) and its agreement with the Containerfile.

Why: the two build the same image by different routes (this project builds and tests the first; the
Containerfile is for Docker/Podman users), so a label, variable, entrypoint or user changed in one
and not the other would ship two different agents under one name.  The build itself is exercised by
tests/e2e/test_image_e2e.py (root, slow).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "hack" / "build-image.sh"


def _script() -> str:
    return SCRIPT.read_text()


def _containerfile_final_stage() -> str:
    text = (ROOT / "Containerfile").read_text().replace("\\\n", " ")
    return text[text.rindex("\nFROM ") :]


def test_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_script_is_shellcheck_clean() -> None:
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def test_make_image_runs_the_script_and_its_output_is_ignored() -> None:
    makefile = (ROOT / "Makefile").read_text()
    target = re.search(r"^image:.*\n\t(.+)$", makefile, re.M)
    assert target is not None and target.group(1) == "bash hack/build-image.sh"
    assert "build/" in (ROOT / ".gitignore").read_text().split()
    assert "OUT=${OUT:-build/spegla-image.tar}" in _script()


def test_same_entrypoint_user_and_venv_as_the_containerfile() -> None:
    script, final = _script(), _containerfile_final_stage()
    assert re.findall(r"--config\.entrypoint (\S+)", script) == ["spegla"]
    assert 'ENTRYPOINT ["spegla"]' in final
    assert re.findall(r"--config\.user (\S+)", script) == ["0:0"] and "USER 0:0" in final
    assert "COPY --from=build /opt/spegla /opt/spegla" in final
    assert "venv --without-pip /opt/spegla" in script
    # both drop the Kubernetes client's asyncio half
    assert "site-packages/kubernetes/aio" in script
    assert "site-packages/kubernetes/aio" in (ROOT / "Containerfile").read_text()


def test_same_environment_and_labels_as_the_containerfile() -> None:
    script, final = _script(), _containerfile_final_stage()
    env = dict(re.findall(r"--config\.env ([A-Z_]+)=(\S+)", script))
    env_block = re.search(r"\nENV (.+)", final)
    assert env_block is not None
    containerfile_env = dict(re.findall(r"([A-Z_]+)=(\S+)", env_block.group(1)))
    assert {k: v for k, v in env.items() if k not in ("PATH", "LANG")} == {
        k: v for k, v in containerfile_env.items() if k != "PATH"
    }
    assert env["PATH"].startswith("/opt/spegla/bin:")
    assert containerfile_env["PATH"].startswith("/opt/spegla/bin:")
    labels = set(re.findall(r'--config\.label "?(org\.opencontainers\.image\.[a-z]+)=', script))
    assert labels == set(re.findall(r'(org\.opencontainers\.image\.[a-z]+)="', final))


def test_archive_is_named_for_containerd_and_oci_tools() -> None:
    script = _script()
    assert "IMAGE=${IMAGE:-localhost/spegla:$VERSION}" in script
    assert '"org.opencontainers.image.ref.name": image' in script
    assert '"io.containerd.image.name": image' in script
    version = re.findall(r'^version = "(.*)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert len(version) == 1, "the script reads the first `version = ` line of pyproject.toml"
