"""The PPO clipped policy loss and how per-token losses are aggregated into one scalar.

Normalisation invariant (why `ppo_clip_loss` returns a *sum*): a step's batch is split into
micro-batches and spread over data-parallel ranks. If every micro-batch contributes
`sum of its masked per-token losses / global_token_count`, where `global_token_count` is the number
of response tokens in the whole optimizer step (all micro-batches, all data-parallel ranks), then
the gradients summed over micro-batches and ranks are exactly the gradient of the token-mean over
the whole batch. verl divides by each micro-batch's own token count instead, which is only an
approximation when micro-batches hold different numbers of tokens. Callers whose data-parallel
reduction *averages* gradients must scale by the data-parallel size to keep the sum.

Deliberately left out for now: dual-clip (`clip_ratio_c`), a KL penalty to a reference policy and
an entropy bonus; the recipes this project reproduces train without them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# verl clamps log(rho) to this range so exp() cannot overflow on a stale or corrupted log-prob.
LOG_RATIO_LIMIT = 20.0


def _check_shapes(**tensors: Tensor) -> None:
    """Raise ValueError unless every tensor has the same 2-D shape [B, T]."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise ValueError(f"expected tensors of one shape [B, T], got {shapes}")


def ppo_clip_token_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                        clip_low: float, clip_high: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token PPO clipped loss [B, T] (0 off the mask) and detached per-batch stat sums.

    loss_t = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - clip_low, 1 + clip_high)),
    rho_t = exp(logprobs_t - old_logprobs_t). Off-mask positions are zeroed *before* exp, so padding
    with arbitrary log-probs cannot produce inf or NaN in the loss or its gradient.

    Stats (sums over masked tokens, so they add up across micro-batches and ranks):
    `clipped_tokens` (tokens where the clipped branch is the active one, verl's pg_clipfrac
    numerator), `ratio_sum`, `approx_kl_sum` (k3 estimator rho - 1 - log rho of KL(old || new)),
    `tokens`.
    """
    _check_shapes(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    on = mask > 0
    log_ratio = torch.where(on, logprobs - old_logprobs, torch.zeros_like(logprobs))
    log_ratio = log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.where(on, torch.maximum(unclipped, clipped), torch.zeros_like(unclipped))
    with torch.no_grad():
        stats = {
            "clipped_tokens": (on & (clipped > unclipped)).sum().to(logprobs.dtype),
            "ratio_sum": torch.where(on, ratio, torch.zeros_like(ratio)).sum(),
            "approx_kl_sum": torch.where(on, ratio - 1.0 - log_ratio, torch.zeros_like(ratio)).sum(),
            "tokens": on.sum().to(logprobs.dtype),
        }
    return per_token, stats


def ppo_clip_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                  clip_low: float, clip_high: float) -> tuple[Tensor, dict[str, Tensor]]:
    """SUM over masked tokens of the PPO clipped loss, plus detached stat sums.

    All tensors are [B, T]; `advantages` is already broadcast to tokens. The caller divides by the
    global response-token count of the optimizer step (see the module docstring), which makes the
    result an exact token-mean however the batch is split.
    """
    per_token, stats = ppo_clip_token_loss(logprobs, old_logprobs, advantages, mask,
                                           clip_low=clip_low, clip_high=clip_high)
    return per_token.sum(), stats


def token_mean(per_token_loss: Tensor, mask: Tensor, global_token_count: float | Tensor) -> Tensor:
    """This micro-batch's share of the step's token-mean: masked sum / global token count.

    `global_token_count` counts response tokens over every micro-batch and data-parallel rank of
    the optimizer step, so the shares add up to the exact token-mean. A count of 0 (an all-padding
    step) is treated as 1 so the loss is 0 rather than NaN.
    """
    on = mask > 0
    total = torch.where(on, per_token_loss, torch.zeros_like(per_token_loss)).sum()
    if isinstance(global_token_count, Tensor):
        return total / global_token_count.to(total.dtype).clamp(min=1)
    return total / max(float(global_token_count), 1.0)


# Name -> aggregation `(per_token_loss [B, T], mask [B, T], global_token_count) -> scalar`.
LOSS_AGGREGATIONS: dict[str, Callable[[Tensor, Tensor, float | Tensor], Tensor]] = {
    "token-mean": token_mean,
}


__all__ = ["LOSS_AGGREGATIONS", "ppo_clip_loss", "ppo_clip_token_loss", "token_mean"]
