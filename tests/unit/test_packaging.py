"""The GPU install set must resolve: `pip install -e '.[gpu,test]'` on the GPU host (Python 3.12, manylinux x86_64).

pip resolves it here with the GPU host's interpreter and platform, reading only package metadata
(`--dry-run`, and `fast-deps` fetches a wheel's metadata with HTTP range requests instead of the whole
wheel: torch's CUDA wheels are GiBs). The project itself is expanded from pyproject.toml into its
requirements (pip cannot build a local project under `--only-binary=:all:`, which foreign platforms need).
The GPU set's resolution starts when the tests are collected (`tests/conftest.py`) and runs beside them.
A machine that cannot reach the package index skips with that reason; any other failure fails.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
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


GPU_RESOLUTION = pytest.StashKey["Resolution"]()  # the GPU set's resolution, started by tests/conftest.py


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


GPU_SET = requirements(("gpu", "test"))


def _pip_command(reqs: list[str], target: Path) -> list[str]:
    """pip's dry-run resolution for CPython 3.12 on manylinux x86_64, its report as JSON on stdout.

    `target` is a scratch folder: pip takes foreign-platform options only with `--target`; a dry run
    writes nothing there."""
    platforms = [arg for tag in PLATFORMS for arg in ("--platform", tag)]
    return [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", "-",
            "--use-feature=fast-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
            "--abi", "cp312", *platforms, "--platform", "any", "--target", str(target), *reqs]


class Resolution:
    """One pip resolution running in the background (it waits on the package index for minutes, using
    little CPU: `tests/conftest.py` starts the GPU set's at collection, so it overlaps the other tests)."""

    def __init__(self, reqs: list[str]) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="gpu-resolution-"))
        self.out, self.err = (self.folder / "stdout").open("w+"), (self.folder / "stderr").open("w+")
        self.proc = subprocess.Popen(_pip_command(reqs, self.folder / "target"), stdout=self.out, stderr=self.err,
                                     text=True)

    def result(self, timeout: float = 900) -> tuple[int, str, dict]:
        """(exit code, output, --report JSON)."""
        code = self.proc.wait(timeout=timeout)
        self.out.seek(0)
        self.err.seek(0)
        stdout, stderr = self.out.read(), self.err.read()
        report: dict = {}
        if code == 0:
            with contextlib.suppress(json.JSONDecodeError):
                report = json.loads(stdout)
        self.close()
        return code, stdout + stderr, report

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.out.close()
        self.err.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def resolve_for_gpu_host(reqs: list[str]) -> tuple[int, str, dict]:
    return Resolution(reqs).result()


def resolved(reqs: list[str], started: Resolution | None = None) -> tuple[int, str, dict[str, str]]:
    """Resolve (or take the result of one `started` earlier), skipping the test (with pip's words) only
    when the package index cannot be reached."""
    code, output, report = started.result() if started is not None else resolve_for_gpu_host(reqs)
    if code != 0 and any(marker in output for marker in NETWORK_ERRORS):
        pytest.skip("the package index cannot be reached from this machine, so the GPU install set cannot be "
                    f"resolved here: {next(m for m in NETWORK_ERRORS if m in output)}")
    versions = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in report.get("install", [])}
    return code, output, versions


@pytest.mark.network
def test_gpu_install_set_resolves_for_the_gpu_host(request: pytest.FixtureRequest) -> None:
    """`.[gpu,test]` resolves, with torch 2.11.0's own triton (3.6.0), vLLM 0.25.1 and megatron-core 0.16.1."""
    code, output, versions = resolved(GPU_SET, request.config.stash.get(GPU_RESOLUTION, None))
    assert code == 0, f"pip cannot resolve .[gpu,test] for the GPU host:\n{output[-3000:]}"
    assert versions["torch"] == "2.11.0" and versions["vllm"] == "0.25.1", versions
    assert versions["triton"] == "3.6.0", f"torch 2.11.0 should bring triton 3.6.0, got {versions['triton']}"
    assert versions["megatron-core"] == "0.16.1"


@pytest.mark.network
def test_a_conflicting_triton_pin_fails_the_resolution() -> None:
    """The check has teeth: the old `test` extra's triton 3.9.0 pin beside torch 2.11.0 must not resolve."""
    code, output, _ = resolved(["torch==2.11.0", "triton==3.9.0"])
    assert code != 0 and "Cannot install torch==2.11.0 and triton==3.9.0" in output, output[-2000:]


def test_triton_is_pinned_only_beside_the_cpu_torch() -> None:
    """No extra that can join `gpu` pins triton; the CPU set keeps triton 3.9.0 (the kernel tests' version)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for extra in project["optional-dependencies"]:
        if extra != "cpu":
            assert not any(r.startswith("triton") for r in requirements((extra,))), extra
    assert "triton==3.9.0" in requirements(("cpu",))
