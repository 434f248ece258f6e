"""A submitted SLURM job: its id and logs, its state, and waiting for it to end through requeues.

nemo-run's own status goes through `sacct`, which needs SLURM's accounting database; clusters and
test clusters without one still answer `scontrol show job` for a finished job for `MinJobAge`
seconds (300 by default), so that is asked first and `sacct` only once the controller forgot the job.
A requeued job (preemption, `scontrol requeue`, nemo-run's `--retries`) keeps its id and goes back
to PENDING, so waiting for an id waits through every requeue; its `Restarts` counts them, and each
start writes its own log (`log-<name>_<id>_<restart>.out`).
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# States a job does not leave by itself (a requeued job is PENDING again, never PREEMPTED for long).
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                          "BOOT_FAIL", "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "REQUEUE_HOLD"})


@dataclass(frozen=True)
class SubmittedJob:
    job_id: str
    log_dir: Path  # nemo-run's job folder: the batch script's log and one srun log per start
    job_name: str

    def log(self, restart: int = 0) -> Path:
        """The job's output (every rank, through torchrun's --tee) for its `restart`-th start."""
        return self.log_dir / f"log-{self.job_name}_{self.job_id}_{restart}.out"

    @property
    def batch_log(self) -> Path:
        return self.log_dir / f"sbatch_{self.job_name}_{self.job_id}.out"


@dataclass(frozen=True)
class JobState:
    state: str  # SLURM's JobState, e.g. RUNNING, PENDING, COMPLETED, FAILED
    exit_code: str  # "status:signal" of the batch script, e.g. "0:0"
    restarts: int  # how many times the job was requeued

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def succeeded(self) -> bool:
        return self.state == "COMPLETED" and self.exit_code == "0:0"


def submitted(job: Any) -> SubmittedJob:
    """The id and log folder of nemo-run's job (handle `slurm_tunnel://nemo_run/<job id>`)."""
    details = job.executor.job_details
    return SubmittedJob(job_id=str(job.handle).rstrip("/").rsplit("/", 1)[-1], log_dir=Path(details.folder),
                        job_name=details.job_name)


def query(job_id: str, env: dict[str, str] | None = None) -> JobState | None:
    """The job's state from `scontrol show job` (or `sacct` once the controller forgot it); None if unknown.
    `env` is the client commands' environment (e.g. another cluster's `SLURM_CONF`), default this one's."""
    done = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, env=env)
    fields = dict(re.findall(r"(\w+)=(\S*)", done.stdout)) if done.returncode == 0 else {}
    if "JobState" in fields:
        return JobState(state=fields["JobState"], exit_code=fields.get("ExitCode", "?"),
                        restarts=int(fields.get("Restarts", 0) or 0))
    done = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State,ExitCode", "-j", job_id],
                          capture_output=True, text=True, env=env)
    rows = [line.split("|") for line in done.stdout.splitlines() if "|" in line] if done.returncode == 0 else []
    if not rows:
        return None
    state, exit_code = rows[-1][0].split()[0], rows[-1][1]  # "CANCELLED by 0" -> CANCELLED
    return JobState(state=state, exit_code=exit_code, restarts=len(rows) - 1)


def wait(job_id: str, *, poll_seconds: float = 5.0, timeout: float | None = None) -> JobState:
    """Block until the job reaches a final state (through any requeues); raises TimeoutError."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        state = query(job_id)
        if state is None:
            raise RuntimeError(f"SLURM job {job_id} is unknown to scontrol and sacct")
        if state.final:
            return state
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"SLURM job {job_id} still {state.state} after {timeout:.0f} s")
        time.sleep(poll_seconds)


def report(job: SubmittedJob, *, wait_for_end: bool) -> int:
    """Print the job's id and log; with `wait_for_end`, wait and print how it ended. The exit status
    is 0 once queued, or with waiting 0 only for COMPLETED with exit code 0:0."""
    print(f"submitted SLURM job {job.job_id}; log: {job.log()} (batch script: {job.batch_log})", flush=True)
    if not wait_for_end:
        return 0
    state = wait(job.job_id)
    requeues = f", after {state.restarts} requeue(s)" if state.restarts else ""
    print(f"SLURM job {job.job_id} {state.state} (exit code {state.exit_code}{requeues}); "
          f"log: {job.log(state.restarts)}", flush=True)
    return 0 if state.succeeded else 1
