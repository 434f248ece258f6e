"""The GPU install set must resolve: `pip install -e '.[gpu,test]'` on the GPU host (Python 3.12, manylinux x86_64).

pip resolves it here with the GPU host's interpreter and platform, reading only package metadata
(`--dry-run`, and `fast-deps` fetches a wheel's metadata with HTTP range requests instead of the whole
wheel: torch's CUDA wheels are GiBs). The project itself is expanded from pyproject.toml into its
requirements (pip cannot build a local project under `--only-binary=:all:`, which foreign platforms need).
A machine that cannot reach the package index skips with that reason; any other failure fails.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Every manylinux tag an x86_64 host with glibc >= 2.34 accepts (pip matches tags exactly, and NCCL's
# wheels, for one, are tagged manylinux_2_18 only).
PLATFORMS = [f"manylinux_{2}_{minor}_x86_64" for minor in range(5, 35)] + \
    ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
NETWORK_ERRORS = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution",
                  "Name or service not known", "Network is unreachable", "ConnectTimeoutError", "ReadTimeoutError",
                  "Connection refused", "SSLError", "ProxyError")


def requirements(extras: tuple[str, ...]) -> list[str]:
    """The project's requirements with `extras`, self-references (`megatron-speed[x]`) expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name, optional = project["name"], project["optional-dependencies"]
    out, todo, seen = list(project["dependencies"]), list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in optional[extra]:
            own = re.fullmatch(rf"{re.escape(name)}\[(.+)\]", req.replace(" ", ""))
            if own:
                todo.extend(own.group(1).split(","))
            else:
                out.append(req)
    return out


def resolve_for_gpu_host(reqs: list[str], target: Path) -> tuple[int, str, dict]:
    """pip's dry-run resolution for CPython 3.12 on manylinux x86_64: (exit code, output, --report JSON).

    `target` is a scratch folder: pip takes foreign-platform options only with `--target`; a dry run
    writes nothing there."""
    platforms = [arg for tag in PLATFORMS for arg in ("--platform", tag)]
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", "-",
           "--use-feature=fast-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
           "--abi", "cp312", *platforms, "--platform", "any", "--target", str(target), *reqs]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    try:
        report = json.loads(done.stdout) if done.returncode == 0 else {}
    except json.JSONDecodeError:
        report = {}
    return done.returncode, done.stdout + done.stderr, report


def resolved(reqs: list[str], target: Path) -> tuple[int, str, dict[str, str]]:
    """Resolve, skipping the test (with pip's words) only when the package index cannot be reached."""
    code, output, report = resolve_for_gpu_host(reqs, target)
    if code != 0 and any(marker in output for marker in NETWORK_ERRORS):
        pytest.skip("the package index cannot be reached from this machine, so the GPU install set cannot be "
                    f"resolved here: {next(m for m in NETWORK_ERRORS if m in output)}")
    versions = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in report.get("install", [])}
    return code, output, versions


@pytest.mark.network
def test_gpu_install_set_resolves_for_the_gpu_host(tmp_path: Path) -> None:
    """`.[gpu,test]` resolves, with torch 2.11.0's own triton (3.6.0), vLLM 0.25.1 and megatron-core 0.16.1."""
    code, output, versions = resolved(requirements(("gpu", "test")), tmp_path)
    assert code == 0, f"pip cannot resolve .[gpu,test] for the GPU host:\n{output[-3000:]}"
    assert versions["torch"] == "2.11.0" and versions["vllm"] == "0.25.1", versions
    assert versions["triton"] == "3.6.0", f"torch 2.11.0 should bring triton 3.6.0, got {versions['triton']}"
    assert versions["megatron-core"] == "0.16.1"


@pytest.mark.network
def test_a_conflicting_triton_pin_fails_the_resolution(tmp_path: Path) -> None:
    """The check has teeth: the old `test` extra's triton 3.9.0 pin beside torch 2.11.0 must not resolve."""
    code, output, _ = resolved(["torch==2.11.0", "triton==3.9.0"], tmp_path)
    assert code != 0 and "Cannot install torch==2.11.0 and triton==3.9.0" in output, output[-2000:]


def test_triton_is_pinned_only_beside_the_cpu_torch() -> None:
    """No extra that can join `gpu` pins triton; the CPU set keeps triton 3.9.0 (the kernel tests' version)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for extra in project["optional-dependencies"]:
        if extra != "cpu":
            assert not any(r.startswith("triton") for r in requirements((extra,))), extra
    assert "triton==3.9.0" in requirements(("cpu",))
