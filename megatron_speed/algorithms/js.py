"""James-Stein (JSPO) shrinkage baseline: shrink each prompt's leave-one-out mean toward the others.

For sample j of prompt i (spec §2.1, generalised to group sizes m_k that may differ):

    b_ij = (1 - λ_i) · μ_i^{-j} + λ_i · μ_{-i},     A_ij = r_ij - b_ij
    μ_i^{-j} = mean of the other m_i - 1 samples of prompt i           (the RLOO part)
    μ_k      = mean of prompt k;  w_k = unbiased variance of prompt k / m_k
    μ_{-i}   = mean of μ_k over the other prompts k != i
    v_{-i}   = mean of w_k over the other prompts k != i that have m_k >= 2 (0 if there are none)
    s_{-i}   = mean of (μ_k - μ_{-i})² over the other prompts k != i
    λ_i      = v_{-i} / (v_{-i} + s_{-i} + eps)                          ("code", the authors' code)
             = (n_{-i} / (n_{-i} + 1)) · v_{-i} / (v_{-i} + s_{-i} + eps) ("paper", the (n-1)/n factor)

where n_{-i} is the number of other non-empty prompts (n - 1 for equal groups). λ_i uses only
other prompts and μ_i^{-j} only the other samples of prompt i, so b_ij is independent of sample
(i, j) and the policy gradient stays unbiased (§2.2). No std division, no clipping: λ_i ∈ [0, 1).

Edge cases (each a deliberate definition, tested):
- Empty groups are ignored: they are not prompts and count nowhere.
- A group of size 1 has no RLOO part; its baseline is μ_{-i} (effective λ = 1, the weight
  `js_shrinkage` reports for it), and it adds no variance term to the other prompts' v_{-i}
  (neither to the sum nor to the count), while its mean does enter their μ_{-i} and s_{-i}. (The
  authors' code takes equal groups of m = batch // prompts samples and asserts m >= 2.)
- No other non-empty prompt (a single group, n = 1): λ = 0, i.e. plain RLOO (A = r for a lone
  size-1 group). The authors' code has no usable answer here: its `compute_jspo_outcome_advantage`
  (JSPO-Official 3f8539d) computes λ from the prompt's own statistics (s = 0, so λ = v/(v+eps):
  ≈ 1 for a group with spread, 0 for an all-equal one), but its leave-one-prompt-out batch mean is
  the mean of an empty tensor, NaN, and (1-λ)·RLOO + λ·NaN is NaN even at λ = 0, so every advantage
  of the batch is NaN (checked by running that function on one group of 4 rewards). We fall back
  to RLOO instead; the result differs from upstream only where upstream's is NaN.
- All-equal groups (e.g. all-0 or all-1): the RLOO part is r̄, so A = λ_i (r̄ - μ_{-i}), not 0.
  They add 0 to the others' v_{-i} and their mean to the others' μ_{-i} and s_{-i} (§2.3).
- Zero spread and zero noise (v + s = 0): eps keeps λ = 0 finite; no NaN anywhere.
- `force_lambda` (ablations, tests) replaces λ_i for every group with >= 2 samples and at least
  one other prompt; the two conventions above still hold.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from megatron_speed.algorithms.groups import (
    Grouped,
    group_means,
    group_variances,
    grouped,
    leave_one_out_means,
)

LambdaVariant = Literal["code", "paper"]

# Variant -> the factor multiplying v/(v+s+eps), from the number of other prompts n_{-i} = n - 1.
_VARIANT_FACTORS: dict[str, Callable[[Tensor], Tensor]] = {
    "code": torch.ones_like,
    "paper": lambda others: others / (others + 1.0),
}


def _leave_one_prompt_out(g: Grouped) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(n_{-i}, μ_{-i}, v_{-i}, s_{-i}) for every group, each [G] float64.

    Totals over the batch minus the group's own term. The means are centred on the batch mean of
    the prompt means before squaring, so s_{-i} does not suffer cancellation when rewards are large
    (Σ_{k≠i}(μ_k - μ_{-i})² = Σ_{k≠i} d_k² - n_{-i}(μ_{-i} - c)², d_k = μ_k - c, for any c).
    Where n_{-i} = 0 the values are finite but meaningless; callers set λ = 0 there.
    """
    present = (g.sizes > 0).double()
    has_variance = (g.sizes > 1).double()
    means = group_means(g)
    weighted_var = group_variances(g, unbiased=True) / g.sizes.clamp(min=1).double() * has_variance

    others = present.sum() - present
    count = others.clamp(min=1.0)
    centre = (means * present).sum() / present.sum().clamp(min=1.0)
    d = (means - centre) * present
    others_mean_offset = (d.sum() - d) / count
    spread = ((d * d).sum() - d * d) / count - others_mean_offset * others_mean_offset
    variance_count = (has_variance.sum() - has_variance).clamp(min=1.0)
    noise = (weighted_var.sum() - weighted_var) / variance_count
    return others, centre + others_mean_offset, noise, spread.clamp(min=0.0)


def _shrinkage(g: Grouped, *, lambda_variant: LambdaVariant, eps: float,
               force_lambda: float | None) -> tuple[Tensor, Tensor]:
    """(effective λ_i, μ_{-i}), each [G] float64, with the edge-case conventions of the module."""
    if lambda_variant not in _VARIANT_FACTORS:
        raise ValueError(f"lambda_variant must be one of {sorted(_VARIANT_FACTORS)}, got {lambda_variant!r}")
    if eps < 0:
        raise ValueError(f"js eps must be >= 0, got {eps}")
    if force_lambda is not None and not 0.0 <= force_lambda <= 1.0:
        raise ValueError(f"force_lambda must lie in [0, 1], got {force_lambda}")
    others, others_mean, noise, spread = _leave_one_prompt_out(g)
    if force_lambda is None:
        lam = _VARIANT_FACTORS[lambda_variant](others) * noise / (noise + spread + eps)
    else:
        lam = torch.full_like(noise, force_lambda)
    lam = torch.where(g.sizes == 1, torch.ones_like(lam), lam)
    lam = torch.where((others == 0) | (g.sizes == 0), torch.zeros_like(lam), lam)
    return lam, others_mean


def js_shrinkage(rewards: Tensor, group_offsets: Tensor, *, lambda_variant: LambdaVariant = "code",
                 eps: float = 1e-6) -> Tensor:
    """λ_i per group, [G], in the dtype of `rewards`: the weight `js` puts on the other prompts' mean.

    In [0, 1) for groups with >= 2 samples; 1 for a size-1 group when other prompts exist; 0 for an
    empty group and when there is no other prompt (see the module docstring). The trainer logs the
    mean as a diagnostic: large when within-prompt noise dominates the spread of prompt means.
    """
    lam, _ = _shrinkage(grouped(rewards, group_offsets), lambda_variant=lambda_variant, eps=eps,
                        force_lambda=None)
    return lam.to(rewards.dtype)


def js(rewards: Tensor, group_offsets: Tensor, *, lambda_variant: LambdaVariant = "code",
       force_lambda: float | None = None, eps: float = 1e-6) -> Tensor:
    """James-Stein advantages A_ij = r_ij - [(1 - λ_i) μ_i^{-j} + λ_i μ_{-i}], [N] (module docstring).

    `lambda_variant="code"` follows the authors' `compute_jspo_outcome_advantage` (no (n-1)/n
    factor); `"paper"` adds it. `force_lambda` fixes λ (0 gives exactly `rloo` on groups of size
    >= 2, 1 gives the leave-one-prompt-out batch mean). The baseline is written as
    (1-λ)·a + λ·b so that λ = 0 and λ = 1 reproduce a and b bit for bit.
    """
    g = grouped(rewards, group_offsets)
    lam, others_mean = _shrinkage(g, lambda_variant=lambda_variant, eps=eps, force_lambda=force_lambda)
    lam_i = lam[g.index]
    baseline = (1.0 - lam_i) * leave_one_out_means(g) + lam_i * others_mean[g.index]
    return (g.values - baseline).to(rewards.dtype)


__all__ = ["LambdaVariant", "js", "js_shrinkage"]
