"""One rank of the 2-rank toy loop (run by test_spmd_engine.py under torchrun): the real trainer with
data-parallel actor ranks and two engine replicas (rollout TP=1), JS advantages, TIS on, small
refit buckets. Writes what must agree across ranks to <out>/loop_rank<r>.pt."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from megatron_speed.config import load_config


def overrides(out: Path) -> list[str]:
    return [f"run.output_dir={out}", "run.steps=2", "eval.every=2", "eval.max_prompts=8",
            "curriculum.prompts_per_step=5", "rollout.n=4", "optim.mini_batch_size=20", "optim.micro_batch_size=4",
            "model.warmup.steps=40", "data.toy.train_size=200", "data.toy.eval_size=8", "rewards.num_workers=1",
            "metrics.progress_bar=false", "metrics.plot=false", "algorithm.tis_cap=2",
            "rollout.refit_bucket_mb=0.25"]


def main() -> None:
    from megatron_speed.setup import build
    from megatron_speed.trainer import Trainer

    out = Path(sys.argv[1])
    parts = build(load_config("toy_cpu_js", overrides(out)))
    try:
        summary = Trainer(parts).fit()
        weights = {n: t.double().sum().item() for n, t in parts.actor.export_hf_weights()}
        torch.save({"steps": summary.steps, "final_accuracy": summary.final_accuracy, "weights": weights,
                    "curriculum": parts.curriculum.metrics(), "engine_calls": parts.engine.calls,
                    "replica": parts.replicas.replica}, out / f"loop_rank{parts.dims.rank}.pt")
    finally:
        parts.close()


if __name__ == "__main__":
    main()
