"""Per-step scalars computed from the step's records (pure functions, no logging side effects)."""

from __future__ import annotations

from collections.abc import Sequence

from megatron_speed.records import RolloutGroup, TrainBatch


def rollout_metrics(groups: Sequence[RolloutGroup], times: dict[str, float]) -> dict[str, float]:
    completions = [c for g in groups for c in g.completions]
    rewards = [r for g in groups for r in g.rewards]
    generated = sum(len(c.token_ids) for c in completions)
    return {
        "reward/mean": sum(rewards) / max(len(rewards), 1),
        "rollout/pass_rate_mean": sum(g.pass_rate for g in groups) / max(len(groups), 1),
        "rollout/all_correct_groups": float(sum(g.pass_rate == 1.0 for g in groups)),
        "rollout/all_wrong_groups": float(sum(g.pass_rate == 0.0 for g in groups)),
        "rollout/response_length": generated / max(len(completions), 1),
        "rollout/truncated_fraction": sum(c.finish_reason == "length" for c in completions) / max(len(completions), 1),
        "rollout/generated_tokens": float(generated),
        "throughput/generate_tokens_per_s": generated / max(times.get("time/generate", 0.0), 1e-9),
    }


_PER_TOKEN = {"clipped_tokens": "train/clip_fraction", "dual_clipped_tokens": "train/dual_clip_fraction",
              "ratio_sum": "train/ratio_mean", "approx_kl_sum": "train/approx_kl", "kl_sum": "train/kl_to_reference",
              "entropy_sum": "train/entropy"}


def train_metrics(batch: TrainBatch, stats: dict[str, float], times: dict[str, float]) -> dict[str, float]:
    tokens = float(batch.response_mask.sum())
    out = {
        "train/accuracy": float((batch.rewards > 0).float().mean()),
        "train/sequences": float(batch.num_sequences),
        "train/response_tokens": tokens,
        "throughput/train_tokens_per_s": float(batch.tokens.numel()) / max(times.get("time/train", 0.0), 1e-9),
    }
    for key, value in stats.items():
        if key == "tokens":
            continue
        if key in _PER_TOKEN:
            out[_PER_TOKEN[key]] = value / max(tokens, 1.0)
        else:
            out[key if "/" in key else f"train/{key}"] = value
    return out
