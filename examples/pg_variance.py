"""Variance of the policy-gradient estimate with the James-Stein baseline vs RLOO, on a fixed policy.

For a fixed policy (the toy warm start), draw B independent batches of `prompts` prompts x `m`
responses with vLLM, and for each batch compute the REINFORCE gradient

    g_b = (1 / #tokens) * sum_{i,t} A_i * grad log pi(y_i,t | ...)

once with RLOO advantages and once with JS advantages on the SAME samples (paired). The reported
variance is the trace of the covariance of g_b across batches, sum_params E||g_b - mean g||^2, the
quantity the JSPO paper reports (its "gradient variance"), estimated with B - 1 in the denominator.

Run: python examples/pg_variance.py --model runs/cache/<hash> [--group-sizes 4 8 16] [--batches 24]
(reproduce_toy.py calls `measure` with the toy model it trained from).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_speed.algorithms import ESTIMATORS
from megatron_speed.config.schema import RolloutConfig, ToyTaskConfig
from megatron_speed.curriculum.batch import build_train_batch
from megatron_speed.data.toy_task import make_problems
from megatron_speed.records import SampleRequest
from megatron_speed.rewards import RewardPool
from megatron_speed.rewards.scoring import score_groups


def flat_gradient(model: torch.nn.Module, tokens: torch.Tensor, mask: torch.Tensor,
                  advantages: torch.Tensor) -> torch.Tensor:
    """The token-mean REINFORCE gradient for one batch, flattened over all parameters."""
    model.zero_grad(set_to_none=True)
    logits = model(tokens).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]
    objective = (advantages[:, None] * logp * mask).sum() / mask.sum().clamp(min=1)
    objective.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def measure(model_path: Path, *, group_sizes: list[int], batches: int, prompts: int, seed: int = 0,
            toy: ToyTaskConfig | None = None) -> dict[str, dict[str, float]]:
    """Trace of the gradient covariance for RLOO and JS at each group size, same samples for both."""
    from transformers import AutoModelForCausalLM

    from megatron_speed.rollout.engine import VLLMEngine

    records = make_problems(toy or ToyTaskConfig(), "train")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    results: dict[str, dict[str, float]] = {}
    rng = random.Random(seed)
    engine = VLLMEngine(model_path, RolloutConfig(max_new_tokens=12, kv_cache_gib=0.25), max_model_len=64, seed=seed)
    with RewardPool("math_verify", 2, 5.0) as pool:
        for m in group_sizes:
            grads: dict[str, list[torch.Tensor]] = {"rloo": [], "js": []}
            for _ in range(batches):
                chosen = rng.sample(records, prompts)
                groups = engine.generate([SampleRequest(prompt=p, n=m) for p in chosen], policy_version=0)
                score_groups(pool, groups)
                batch = build_train_batch(groups, pad_id=0)
                for name in grads:
                    adv = ESTIMATORS[name](batch.rewards, batch.group_offsets)
                    grads[name].append(flat_gradient(model, batch.tokens, batch.response_mask, adv))
            results[str(m)] = _summarise(grads)
    return results


def _summarise(grads: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, gs in grads.items():
        stacked = torch.stack(gs).double()
        out[f"{name}_trace_cov"] = float(((stacked - stacked.mean(0)) ** 2).sum(1).sum() / (len(gs) - 1))
        out[f"{name}_mean_sq_norm"] = float((stacked ** 2).sum(1).mean())
    out["js_reduction_percent"] = 100.0 * (1 - out["js_trace_cov"] / out["rloo_trace_cov"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="HF folder of the fixed policy")
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("runs/pg_variance.json"))
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    res = measure(args.model, group_sizes=args.group_sizes, batches=args.batches, prompts=args.prompts)
    print(f"{'m':>4} {'RLOO tr(Cov)':>14} {'JS tr(Cov)':>14} {'reduction':>10}")
    for m, r in res.items():
        print(f"{m:>4} {r['rloo_trace_cov']:>14.4e} {r['js_trace_cov']:>14.4e} {r['js_reduction_percent']:>9.1f}%")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
