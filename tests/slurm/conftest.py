"""The `slurm_cluster` fixture: a private two-node SLURM cluster on this host for the tests that ask for it.

Started once per session, stopped at its end (its jobs cancelled, its own daemons ended; nothing
else on the machine is touched). The packages come from the README's test command
(`sh tests/slurm/install.sh`). Missing packages fail the tests with that command where it could
have installed them (root with apt-get) but was not run; they skip, saying why, only where it cannot
(no root, no apt-get, or apt-get failed: the reason it recorded in `INSTALL_FAILED`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.slurm.cluster import INSTALL, LocalSlurm, missing_programs

INSTALL_FAILED = Path(os.environ.get("TMPDIR", tempfile.gettempdir()), "megatron-speed-slurm-install.failed")


def _installable() -> bool:
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[LocalSlurm]:
    missing = missing_programs()
    if missing and not _installable():
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing) and cannot be here: installing "
                    "slurm-wlm and munge needs root and apt-get (tests/slurm/install.sh)")
    if missing and INSTALL_FAILED.exists():
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing): {INSTALL_FAILED.read_text().strip()}")
    if missing:
        pytest.fail(f"SLURM programs missing: {', '.join(missing)}; run `{INSTALL}` (README, test command)")
    if os.geteuid() != 0:
        pytest.skip("a private SLURM cluster needs root: slurmd launches the jobs and munged runs as the munge user")
    cluster = LocalSlurm(nodes=("n1", "n2")).start()
    try:
        yield cluster
    finally:
        cluster.stop()
