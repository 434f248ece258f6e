"""`launch.py --executor slurm` against a real SLURM cluster: two nodes on this host (`slurm_cluster`).

Every job is the toy task on 2 nodes x 1 rank, submitted by nemo-run's SlurmExecutor through a local
tunnel (no container): sbatch, then srun starts torchrun on each node, c10d rendezvous on the head
node, gloo between the ranks. All jobs share one output folder, so the toy's warm start is built by
the first job and reused by the others (`run.output_dir/cache`).

1. The reference job completes, reports its exit status and log, trains and improves held-out accuracy.
2. A job preempted mid-run (`scontrol requeue`: SIGTERM, then requeued) checkpoints after its current
   step, exits, restarts and resumes; its per-step metrics (timings aside) and final weights are
   bitwise those of the reference, as the in-process resume test asserts (tests/unit/test_checkpoint.py).
3. A rank SIGKILLed under `--max-restarts 1`: torchrun restarts the worker group, which resumes from
   the latest complete checkpoint, with the same result.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_speed.launch.slurm import JobState, query
from tests.slurm.cluster import LocalSlurm
from tests.unit.test_checkpoint import _metrics, _weights

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8
TOY = [f"run.steps={STEPS}", "eval.every=0", "eval.max_prompts=128", "run.save_every=2", "run.keep_last=2",
       "metrics.progress_bar=false", "metrics.plot=false", "metrics.tensorboard=false"]
SLURM = ["--executor", "slurm", "--nodes", "2", "--nproc", "1", "--gpus-per-node", "0", "--account", "test",
         "--partition", "debug", "--env", "OMP_NUM_THREADS=1"]
JOB_TIMEOUT = 1500  # a safety net: a job takes 1-2 minutes on an idle 2-core machine


def launch(cluster: LocalSlurm, out: Path, name: str, *extra: str, timeout: float = 600) -> str:
    """Submit the toy job `name` (writing under `out`); returns launch.py's output."""
    env = {**cluster.env, "NEMORUN_HOME": str(out / "nemorun"), "COLUMNS": "20000",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run([sys.executable, str(ROOT / "launch.py"), "toy_cpu", f"run.output_dir={out}",
                           f"run.name={name}", *TOY, *SLURM, *extra], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout


def submitted(stdout: str) -> tuple[str, Path]:
    found = re.search(r"submitted SLURM job (\d+); log: (\S+)", stdout)
    assert found, stdout[-2000:]
    return found.group(1), Path(found.group(2))


def state(cluster: LocalSlurm, job_id: str) -> JobState:
    found = query(job_id, env=cluster.env)
    assert found is not None, f"job {job_id} unknown"
    return found


def wait_for_step(cluster: LocalSlurm, job_id: str, run_dir: Path, step: int) -> None:
    """Until rank 0 has logged `step` (the job must still be running)."""
    deadline = time.monotonic() + JOB_TIMEOUT
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()
                                    if line.strip()):
            return
        now = state(cluster, job_id)
        assert not now.final, f"job {job_id} ended ({now}) before step {step}: {cluster.logs()}"
        time.sleep(1)
    pytest.fail(f"job {job_id} did not reach step {step} in {JOB_TIMEOUT} s")


def wait_for_end(cluster: LocalSlurm, job_id: str) -> JobState:
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline:
        now = state(cluster, job_id)
        if now.final:
            return now
        time.sleep(2)
    pytest.fail(f"job {job_id} did not end in {JOB_TIMEOUT} s: {state(cluster, job_id)}")


def rank_pid(run_name: str, rank: int) -> int:
    """The torchrun worker of `rank` in the job writing `run.name=run_name` (found through /proc)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (b"megatron_speed.launch.job" in cmdline and f"run.name={run_name}".encode() in cmdline
                and f"RANK={rank}".encode() in environ):
            return int(proc.name)
    raise AssertionError(f"no rank {rank} process of run {run_name}")


def assert_same_run(reference: Path, other: Path) -> None:
    want, got = _metrics(reference), _metrics(other)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(STEPS + 1))
    for a, b in zip(want, got):
        assert a == b, {k: (a.get(k), b.get(k)) for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    a, b = _weights(reference / "hf" / "final"), _weights(other / "hf" / "final")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The jobs' run.output_dir; a toy warm start cached by an earlier `python launch.py toy_cpu` in this
    checkout (runs/cache, keyed by the task and model config) is copied in, else the first job builds it."""
    folder = tmp_path_factory.mktemp("slurm_runs")
    if (ROOT / "runs" / "cache").is_dir():
        shutil.copytree(ROOT / "runs" / "cache", folder / "cache")
    return folder


@pytest.fixture(scope="module")
def reference(slurm_cluster: LocalSlurm, out: Path) -> tuple[str, str]:
    """The uninterrupted job, waited for by launch.py itself (`--wait`); returns (job id, launch output)."""
    stdout = launch(slurm_cluster, out, "reference", "--wait", timeout=JOB_TIMEOUT)
    return submitted(stdout)[0], stdout


def test_two_node_job_completes_and_improves_heldout_accuracy(slurm_cluster: LocalSlurm, out: Path,
                                                              reference: tuple[str, str]) -> None:
    job_id, stdout = reference
    ended = re.search(rf"SLURM job {job_id} (\S+) \(exit code (\S+)\); log: (\S+)", stdout)
    assert ended and ended.group(1, 2) == ("COMPLETED", "0:0"), stdout[-3000:]
    log = Path(ended.group(3)).read_text()
    assert "[reference] held-out accuracy" in log  # the run's summary line, printed by rank 0
    assert "group_world_size=2" in log and "global_world_sizes=[2]" in log  # torchrun on both nodes
    nodes = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=slurm_cluster.env, capture_output=True,
                           text=True).stdout
    assert "NodeList=n[1-2]" in nodes and "NumNodes=2" in nodes, nodes
    summary = json.loads((out / "reference" / "summary.json").read_text())
    assert summary["steps"] == STEPS
    print(f"held-out accuracy {summary['warm_start_accuracy']:.3f} -> {summary['final_accuracy']:.3f}")
    assert summary["final_accuracy"] >= summary["warm_start_accuracy"] + 0.03
    assert (out / "reference" / "ranks" / "rank1" / "metrics.jsonl").exists()  # rank 1 trained too


def test_preempted_job_requeues_and_matches_the_uninterrupted_run(slurm_cluster: LocalSlurm, out: Path,
                                                                  reference: tuple[str, str]) -> None:
    job_id, first_log = submitted(launch(slurm_cluster, out, "preempted"))
    wait_for_step(slurm_cluster, job_id, out / "preempted", 3)
    subprocess.run(["scontrol", "requeue", job_id], env=slurm_cluster.env, check=True)  # SIGTERM, then requeue
    ended = wait_for_end(slurm_cluster, job_id)
    assert (ended.state, ended.exit_code, ended.restarts) == ("COMPLETED", "0:0", 1), ended
    first = first_log.read_text()
    stopped = re.search(r"\[preempted\] stopped by SIGTERM after step (\d+) of 8", first)
    assert stopped, first[-4000:]
    assert 3 <= int(stopped.group(1)) < STEPS
    second = first_log.with_name(first_log.name.replace(f"_{job_id}_0.out", f"_{job_id}_1.out")).read_text()
    assert f"step_{int(stopped.group(1)):06d} (run.resume=auto)" in second  # the requeued job resumed there
    assert "[preempted] held-out accuracy" in second
    assert_same_run(out / "reference", out / "preempted")


def test_killed_rank_restarts_and_matches_the_uninterrupted_run(slurm_cluster: LocalSlurm, out: Path,
                                                                reference: tuple[str, str]) -> None:
    job_id, log = submitted(launch(slurm_cluster, out, "crashed", "--max-restarts", "1"))
    wait_for_step(slurm_cluster, job_id, out / "crashed", 3)
    os.kill(rank_pid("crashed", 1), signal.SIGKILL)
    ended = wait_for_end(slurm_cluster, job_id)
    text = log.read_text()
    assert (ended.state, ended.exit_code, ended.restarts) == ("COMPLETED", "0:0", 0), (ended, text[-4000:])
    assert "Worker group FAILED. 1/1 attempts left; will restart worker group" in text
    assert re.search(r"resuming from \S+step_0000\d\d \(run.resume=auto\)", text)
    assert_same_run(out / "reference", out / "crashed")
