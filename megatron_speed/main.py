"""Run one training job from a validated config: build, train, summarise, plot."""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

from megatron_speed.config.schema import Config
from megatron_speed.metrics import plot_accuracy_vs_time
from megatron_speed.parallel.stop import STOPPED_EXIT_CODE
from megatron_speed.trainer import RunSummary, Trainer


def peak_memory_gib() -> float:
    """Peak resident memory of this process plus its finished children (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 2**20


def run(cfg: Config) -> RunSummary:
    from megatron_speed.setup import build

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("megatron", "vllm"):  # their INFO lines (bucket layouts, engine config) drown the run's own
        logging.getLogger(noisy).setLevel(logging.WARNING)
    started = time.perf_counter()
    parts = build(cfg)
    setup_seconds = time.perf_counter() - started
    try:
        summary = Trainer(parts).fit()
    finally:
        parts.close()
    if summary.stopped_by_signal:  # preempted: the checkpoint is written; summary.json waits for the end
        if parts.dims.is_main:
            print(f"[{cfg.run.name}] stopped by SIGTERM after step {summary.steps} of {cfg.run.steps}: checkpoint in "
                  f"{parts.out_dir / 'checkpoints'}; a requeued or restarted job resumes from it (run.resume=auto)",
                  flush=True)
    elif parts.dims.is_main:
        report(cfg, parts.out_dir, summary, model_path=parts.hf_path, setup_seconds=setup_seconds,
               total_seconds=time.perf_counter() - started)
    return summary


def exit_status(summary: RunSummary) -> int:
    """0 for a finished run; 143 (128 + SIGTERM) for one stopped by a signal after its checkpoint, so
    torchrun, the batch script and SLURM see an unfinished job (nemo-run's `--retries` requeue it)."""
    return STOPPED_EXIT_CODE if summary.stopped_by_signal else 0


def report(cfg: Config, out_dir: Path, summary: RunSummary, *, model_path: Path, setup_seconds: float,
           total_seconds: float) -> None:
    """Write summary.json and the accuracy plot, and print the one-line summary."""
    if cfg.metrics.plot:
        sets = {f"{name} ({summary.set_metrics.get(name, '')})": curve for name, curve in summary.set_curves.items()}
        plot_accuracy_vs_time(summary.accuracy_curve, out_dir / "heldout_accuracy.png",
                              title=f"{cfg.run.name}: held-out accuracy vs RL seconds",
                              baseline=summary.warm_start_accuracy, sets=sets if len(sets) > 1 else None)
    record = {**asdict(summary), "gain_points": summary.gain_points, "model_path": str(model_path),
              "setup_seconds": setup_seconds,
              "total_seconds": total_seconds, "peak_memory_gib": peak_memory_gib()}
    (out_dir / "summary.json").write_text(json.dumps(record, indent=2))
    print(f"[{cfg.run.name}] held-out accuracy {summary.warm_start_accuracy:.3f} -> {summary.final_accuracy:.3f} "
          f"({summary.gain_points:+.1f} pts) in {summary.steps} steps; RL {summary.seconds:.0f} s, "
          f"evaluation {summary.eval_seconds:.0f} s, setup "
          f"{setup_seconds:.0f} s, total {total_seconds:.0f} s; peak memory {record['peak_memory_gib']:.2f} GiB; "
          f"logs in {out_dir}", flush=True)
    for name, hit in summary.time_to_target.items():
        when = "not reached" if hit["seconds"] is None else f"reached at RL {hit['seconds']:.0f} s" + (
            "" if hit["step"] is None else f", step {hit['step']:.1f}")
        print(f"[{cfg.run.name}] time to target {name} >= {hit['target']}: {when}", flush=True)
