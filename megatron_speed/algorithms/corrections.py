"""Off-policy corrections: per-token weights on the policy-gradient loss for samples the engine drew.

The engine samples from pi_behav (its kernels and precision and, when disaggregated, a policy up to
`rollout.max_staleness` versions old); the actor recomputes pi_prox, the log-probs of the same tokens
under its current weights, before the update (the trainer's `old_logprobs`). Every correction here is
a function of rho_t = exp(log pi_prox - log pi_behav) on the sampled tokens, returning a detached
weight w_t >= 0 per token (0 off the mask) that multiplies that token's PPO-clip loss:

    loss_t = w_t * max(-A_t r_t, -A_t clip(r_t, 1 - eps_low, 1 + eps_high)),  r_t = pi_theta / pi_prox.

Because w_t is a non-negative constant per token, w * loss(A) = loss(w * A) in every clip branch
(and under dual-clip), so the trainer applies w by scaling the token advantages and the actor's loss
needs no extra input (`tests/unit/test_corrections.py` checks the loss and the gradient by hand).

- "none": w = 1.
- "tis" (truncated IS; verl, slime): w = min(rho, cap).
- "icepop" (Ring-1T's ICEPOP, token-level masking): w = rho inside [1/beta, beta], 0 outside.
- "seq_mis" (sequence-level masked IS on the geometric mean): g = exp(mean_t log rho_t) over a
  response; every token of that response gets w = g if g is inside [1/beta, beta], else 0.
- "decoupled" (AReaL's decoupled PPO): the trust region is around pi_prox (our PPO always clips around
  the actor's recomputed log-probs, which is what makes a stale batch safe to clip) and the behaviour
  weight w = rho corrects for sampling from pi_behav; tokens with rho > cap are masked (w = 0), as
  AReaL's `behav_imp_weight_cap`, rather than truncated as TIS does.

A masked token keeps its place in the loss's denominator (it contributes 0, it is not removed), so the
aggregation (`aggregation.py`) normalises every correction alike; verl's rejection-sampling modes
shrink the mask instead. Deliberately left out: anything that reads the config or torch.distributed.

Stats are detached sums over masked tokens (they add across micro-batches and ranks):
`weight_sum`, `truncated_tokens` (TIS hit the cap), `masked_tokens` (w forced to 0), `tokens`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from megatron_speed.algorithms.losses import LOG_RATIO_LIMIT, truncated_is_weights

Correction = Callable[..., tuple[Tensor, dict[str, Tensor]]]


def _log_rho(old_logprobs: Tensor, rollout_logprobs: Tensor, on: Tensor) -> Tensor:
    """log pi_prox - log pi_behav on the mask, 0 off it, clamped like every log-ratio here."""
    diff = torch.where(on, old_logprobs.detach() - rollout_logprobs.detach(), torch.zeros_like(old_logprobs))
    return diff.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)


def _stats(weights: Tensor, on: Tensor, *, truncated: Tensor | None = None,
           masked: Tensor | None = None) -> dict[str, Tensor]:
    zero = torch.zeros((), dtype=weights.dtype, device=weights.device)
    return {"weight_sum": weights.sum(),
            "truncated_tokens": zero if truncated is None else (on & truncated).sum().to(weights.dtype),
            "masked_tokens": zero if masked is None else (on & masked).sum().to(weights.dtype),
            "tokens": on.sum().to(weights.dtype)}


@torch.no_grad()
def no_correction(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, *, cap: float,
                  beta: float) -> tuple[Tensor, dict[str, Tensor]]:
    """w = 1 on the mask: the plain PPO objective around the recomputed log-probs."""
    on = mask > 0
    weights = on.to(old_logprobs.dtype)
    return weights, _stats(weights, on)


@torch.no_grad()
def tis(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, *, cap: float,
        beta: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Token TIS: w = min(rho, cap) (`losses.truncated_is_weights`)."""
    weights, s = truncated_is_weights(old_logprobs, rollout_logprobs, mask, cap=cap)
    on = mask > 0
    out = _stats(weights, on)
    out["truncated_tokens"] = s["tis_clipped_tokens"]
    return weights, out


def _within_band(rho: Tensor, on: Tensor, beta: float) -> tuple[Tensor, dict[str, Tensor]]:
    """w = rho on response tokens where 1/beta <= rho <= beta, else 0 (counted as masked)."""
    outside = (rho < 1.0 / beta) | (rho > beta)
    weights = torch.where(on & ~outside, rho, torch.zeros_like(rho))
    return weights, _stats(weights, on, masked=outside)


@torch.no_grad()
def icepop(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, *, cap: float,
           beta: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Token masking: w = rho where 1/beta <= rho <= beta, else 0."""
    _check_beta(beta)
    on = mask > 0
    return _within_band(torch.exp(_log_rho(old_logprobs, rollout_logprobs, on)), on, beta)


@torch.no_grad()
def seq_mis(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, *, cap: float,
            beta: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Sequence-level masked IS: the geometric-mean rho of each response on all its tokens, or 0
    for the whole response when it lies outside [1/beta, beta]."""
    _check_beta(beta)
    on = mask > 0
    log_rho = _log_rho(old_logprobs, rollout_logprobs, on)
    lengths = on.sum(dim=1, keepdim=True).clamp(min=1)
    return _within_band(torch.exp(log_rho.sum(dim=1, keepdim=True) / lengths).expand_as(log_rho), on, beta)


@torch.no_grad()
def decoupled(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, *, cap: float,
              beta: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Decoupled PPO's behaviour weight: w = rho (pi_prox / pi_behav), masked to 0 where rho > cap."""
    if not cap >= 1.0:
        raise ValueError(f"the decoupled-PPO cap must be >= 1, got {cap}")
    on = mask > 0
    rho = torch.exp(_log_rho(old_logprobs, rollout_logprobs, on))
    over = rho > cap
    weights = torch.where(on & ~over, rho, torch.zeros_like(rho))
    return weights, _stats(weights, on, masked=over)


def _check_beta(beta: float) -> None:
    if not beta > 1.0:
        raise ValueError(f"the kept band [1/beta, beta] needs beta > 1, got {beta}")


CORRECTIONS: dict[str, Correction] = {"none": no_correction, "tis": tis, "icepop": icepop, "seq_mis": seq_mis,
                                      "decoupled": decoupled}

__all__ = ["CORRECTIONS", "decoupled", "icepop", "no_correction", "seq_mis", "tis"]
