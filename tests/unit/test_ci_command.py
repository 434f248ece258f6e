"""`.ci/run` runs exactly the README's test command (its set-up included: tests/slurm/install.sh)."""

from __future__ import annotations

import re
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
