"""One rank of the 2-rank toy loop (run by test_spmd_engine.py under torchrun): the real trainer with
data-parallel actor ranks and two engine replicas (rollout TP=1), JS advantages, TIS on, small
refit buckets. Writes what must agree across ranks to <out>/loop_rank<r>.pt."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from megatron_speed.recipes import load_recipe


def overrides(out: Path) -> list[str]:
    return [f"run.output_dir={out}", "run.steps=2", "eval.every=2", "eval.max_prompts=8",
            "curriculum.prompts_per_step=5", "rollout.n=4", "optim.mini_batch_size=20", "optim.micro_batch_size=4",
            "model.warmup.steps=40", "data.toy.train_size=200", "data.toy.eval_size=8", "rewards.num_workers=1",
            "metrics.progress_bar=false", "metrics.plot=false", "algorithm.is_correction=tis", "algorithm.is_cap=2",
            "rollout.refit_bucket_mb=0.25"]


def sharded_evaluation(parts) -> dict[str, object]:
    """Greedy accuracy over all held-out prompts on this rank alone vs spread over the two replicas,
    and how many prompts this rank's engine decoded for the spread one."""
    from megatron_speed.evaluate import evaluate_sets, greedy_correct

    alone = greedy_correct(parts.engine, parts.rewards, parts.eval_records)
    seen, generate_greedy = [], parts.engine.generate_greedy
    parts.engine.generate_greedy = lambda records: seen.append(len(records)) or generate_greedy(records)
    report = evaluate_sets(parts.engine, parts.rewards, parts.eval_records, k=2, temperature=1.0, top_p=1.0,
                           pass_ks=(1, 2), replicas=parts.replicas)
    return {"alone_accuracy": sum(alone) / len(alone), "spread_accuracy": report.greedy_accuracy,
            "spread_decoded": sum(seen), "spread_correct": {n: r.correct for n, r in report.sets.items()}}


def main() -> None:
    from megatron_speed.setup import build
    from megatron_speed.trainer import Trainer

    out = Path(sys.argv[1])
    parts = build(load_recipe("toy_cpu_js", overrides(out)))
    try:
        summary = Trainer(parts).fit()
        weights = {n: t.double().sum().item() for n, t in parts.actor.export_hf_weights()}
        evaluation = sharded_evaluation(parts)
        torch.save({"steps": summary.steps, "final_accuracy": summary.final_accuracy, "weights": weights,
                    "curriculum": parts.curriculum.metrics(), "engine_calls": parts.engine.calls,
                    "replica": parts.replicas.replica, **evaluation}, out / f"loop_rank{parts.dims.rank}.pt")
    finally:
        parts.close()


if __name__ == "__main__":
    main()
