"""The PPO clipped policy loss, per-token KL and entropy terms, and their combination.

Everything here works per token ([B, T] tensors) and is aggregated last, by one of the
`LOSS_AGGREGATIONS` (see `aggregation.py` for the normalisation invariant: each micro-batch returns
a numerator and an integer denominator, and the step's loss is Σ numerators / Σ denominators over
all micro-batches and data-parallel ranks). A KL penalty and an entropy bonus are per-token terms
added to the policy-gradient loss *before* aggregation, as verl does, so they are normalised the
same way.

Stats are detached SUMS over masked tokens, so they add up across micro-batches and ranks; the
caller divides by the summed `tokens` to report means.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from megatron_speed.algorithms.aggregation import LOSS_AGGREGATIONS, aggregate_loss

# verl clamps log-ratios to this range so exp() cannot overflow on a stale or corrupted log-prob.
LOG_RATIO_LIMIT = 20.0


def _check_shapes(**tensors: Tensor) -> None:
    """Raise ValueError unless every tensor has the same 2-D shape [B, T]."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise ValueError(f"expected tensors of one shape [B, T], got {shapes}")


def _masked_log_ratio(logprobs: Tensor, reference: Tensor, on: Tensor) -> Tensor:
    """logprobs - reference on the mask, 0 off it (set *before* exp, so padding cannot overflow)."""
    log_ratio = torch.where(on, logprobs - reference, torch.zeros_like(logprobs))
    return log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)


def ppo_clip_token_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                        clip_low: float, clip_high: float,
                        clip_c: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token PPO clipped loss [B, T] (0 off the mask) and detached per-batch stat sums.

    loss_t = max(-A_t ρ_t, -A_t clip(ρ_t, 1 - clip_low, 1 + clip_high)), ρ_t = exp(logp_t - old_t).
    Dual-clip (verl's `clip_ratio_c`, `clip_c > 1`): for A_t < 0 the loss is further capped at
    -A_t·clip_c, which bounds the update from a token whose ratio has run far above 1; positive
    advantages are unaffected. `clip_c=None` disables it.

    Stats: `clipped_tokens` (the clipped branch is active, verl's pg_clipfrac numerator),
    `dual_clipped_tokens` (A < 0 and the dual-clip cap is active, pg_clipfrac_lower; 0 without
    dual-clip), `ratio_sum`, `approx_kl_sum` (k3 estimator ρ - 1 - log ρ of KL(old || new)), `tokens`.
    """
    _check_shapes(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    if clip_c is not None and not clip_c > 1.0:
        raise ValueError(f"dual-clip clip_c must be > 1 (verl's clip_ratio_c), got {clip_c}")
    on = mask > 0
    log_ratio = _masked_log_ratio(logprobs, old_logprobs, on)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    dual = torch.zeros_like(on)
    if clip_c is not None:
        cap = -advantages * clip_c
        dual = on & (advantages < 0) & (loss > cap)
        loss = torch.where(advantages < 0, torch.minimum(loss, cap), loss)
    per_token = torch.where(on, loss, torch.zeros_like(loss))
    with torch.no_grad():
        stats = {
            "clipped_tokens": (on & (clipped > unclipped)).sum().to(logprobs.dtype),
            "dual_clipped_tokens": dual.sum().to(logprobs.dtype),
            "ratio_sum": torch.where(on, ratio, torch.zeros_like(ratio)).sum(),
            "approx_kl_sum": torch.where(on, ratio - 1.0 - log_ratio, torch.zeros_like(ratio)).sum(),
            "tokens": on.sum().to(logprobs.dtype),
        }
    return per_token, stats


def ppo_clip_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                  clip_low: float, clip_high: float, clip_c: float | None = None,
                  aggregation: str = "token-mean",
                  horizon: int = 1) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(numerator, denominator, stats) of the PPO clipped loss for one micro-batch.

    All tensors are [B, T]; `advantages` is already broadcast to tokens. The numerator and integer
    denominator follow `LOSS_AGGREGATIONS[aggregation]` (`horizon` = max response length, used by
    `seq-mean-token-sum-norm`); the step's loss is Σ numerators / Σ denominators over every
    micro-batch and rank. Callers adding KL or entropy terms use `ppo_clip_token_loss`,
    `policy_objective` and `aggregate_loss` directly.
    """
    per_token, stats = ppo_clip_token_loss(logprobs, old_logprobs, advantages, mask,
                                           clip_low=clip_low, clip_high=clip_high, clip_c=clip_c)
    numerator, denominator = aggregate_loss(per_token, mask, aggregation=aggregation, horizon=horizon)
    return numerator, denominator, stats


def truncated_is_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, *,
                         cap: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Truncated importance-sampling weights [B, T] for samples drawn by the rollout engine.

    w_t = min(exp(old_t - rollout_t), cap), detached, 0 off the mask: `old` is the actor's log-prob
    of the sampled token before the update, `rollout` the engine's (same weights, different
    kernels/precision). As in verl's and slime's TIS, w multiplies the per-token policy-gradient
    loss only (not KL or entropy terms), correcting the PPO objective for sampling from the
    engine's distribution instead of the actor's. Because w >= 0 is a constant per token,
    w * max(-A ρ, -A clip(ρ)) = max(-(wA) ρ, -(wA) clip(ρ)) (and the dual-clip min likewise), so
    the trainer applies it by scaling the token advantages -- same loss, same clip decisions.

    Stats (detached sums over masked tokens): `tis_weight_sum`, `tis_clipped_tokens` (w hit the cap).
    """
    _check_shapes(old_logprobs=old_logprobs, rollout_logprobs=rollout_logprobs, mask=mask)
    if not cap >= 1.0:
        raise ValueError(f"TIS cap must be >= 1 (a cap below 1 down-weights every on-policy token), got {cap}")
    on = mask > 0
    with torch.no_grad():
        raw = torch.exp(_masked_log_ratio(old_logprobs.detach(), rollout_logprobs.detach(), on))
        weights = torch.where(on, raw.clamp(max=cap), torch.zeros_like(raw))
        stats = {"tis_weight_sum": weights.sum(), "tis_clipped_tokens": (on & (raw > cap)).sum().to(weights.dtype)}
    return weights, stats


def _k1(log_ratio: Tensor) -> Tensor:
    """log π - log π_ref: unbiased for KL(π || π_ref) under samples from π, can be negative."""
    return log_ratio


def _k3(log_ratio: Tensor) -> Tensor:
    """exp(-x) + x - 1 with x = log π - log π_ref (verl's low_var_kl before its ±10 clamp); >= 0."""
    return torch.exp(-log_ratio) + log_ratio - 1.0


KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {"k1": _k1, "k3": _k3}


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kind: Literal["k1", "k3"]) -> Tensor:
    """Per-token estimate [B, T] of KL(π || π_ref) from sampled tokens, 0 off the mask.

    k1 = logp - ref; k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman's low-variance, >= 0).
    The log-ratio is clamped to ±20 before exp, like the PPO ratio; unlike verl, k3 itself is not
    clamped at 10, so its gradient never silently vanishes. Added to the per-token loss with a
    coefficient (`policy_objective`) before aggregation.
    """
    _check_shapes(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; known: {sorted(KL_ESTIMATORS)}")
    on = mask > 0
    kl = KL_ESTIMATORS[kind](_masked_log_ratio(logprobs, ref_logprobs, on))
    return torch.where(on, kl, torch.zeros_like(kl))


def policy_objective(per_token_pg_loss: Tensor, *, kl: Tensor | None = None, kl_coef: float = 0.0,
                     entropy: Tensor | None = None, entropy_coef: float = 0.0) -> Tensor:
    """Per-token loss [B, T]: pg loss + kl_coef·kl - entropy_coef·entropy (an entropy *bonus*).

    Terms that are None are left out; a nonzero coefficient without its tensor is an error (a
    configured regulariser must not be dropped silently). Masking happens in the aggregation.
    """
    total = per_token_pg_loss
    for name, term, coef, sign in (("kl", kl, kl_coef, 1.0), ("entropy", entropy, entropy_coef, -1.0)):
        if term is None:
            if coef != 0.0:
                raise ValueError(f"{name}_coef is {coef} but no {name} tensor was given")
            continue
        if term.shape != per_token_pg_loss.shape:
            raise ValueError(f"{name} has shape {tuple(term.shape)}, expected {tuple(per_token_pg_loss.shape)}")
        total = total + (sign * coef) * term
    return total


__all__ = ["KL_ESTIMATORS", "LOG_RATIO_LIMIT", "LOSS_AGGREGATIONS", "aggregate_loss", "kl_penalty",
           "policy_objective", "ppo_clip_loss", "ppo_clip_token_loss", "truncated_is_weights"]
