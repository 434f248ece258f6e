"""`.ci/run` runs exactly the README's test command (its set-up included: tests/slurm/install.sh)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"Run the tests \(this is exactly what `\.ci/run` does\):\s*```bash\n(.+?)\n```", readme, re.S)
    assert block, "README lost its test command block"
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    ci = [line for line in lines if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == [block.group(1).strip()]
    assert block.group(1).startswith("sh tests/slurm/install.sh && ")  # the SLURM tests' packages, when missing


def test_slurm_install_that_cannot_reach_a_mirror_records_why_and_lets_the_tests_run(tmp_path: Path) -> None:
    """apt-get failing (no network) must not stop `.ci/run`: install.sh succeeds and leaves the reason
    for the SLURM fixture to skip with."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {"id": "echo 0", "apt-get": "echo 'E: Failed to fetch (network unreachable)'; exit 100"}
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    for tool in ("tail", "tee", "rm"):
        (bin_dir / tool).symlink_to(shutil.which(tool) or f"/usr/bin/{tool}")
    env = {"PATH": str(bin_dir), "TMPDIR": str(tmp_path)}  # no sbatch on this PATH
    done = subprocess.run(["/bin/sh", str(ROOT / "tests/slurm/install.sh")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    marker = tmp_path / "megatron-speed-slurm-install.failed"
    assert "network unreachable" in marker.read_text()
    assert "the SLURM tests will skip" in done.stdout
