"""Advantage estimators: per-trajectory advantages from scalar rewards grouped by prompt.

Every estimator has the signature `f(rewards, group_offsets, **options) -> advantages`:
`rewards` is a float tensor [N] with one scalar per trajectory, and the trajectories of prompt g
are `rewards[group_offsets[g]:group_offsets[g+1]]` (`group_offsets` is [G+1] int64, starting at 0
and ending at N; groups may differ in size, and empty groups are allowed and ignored). Options are
estimator-specific keyword arguments; the trainer looks the estimator up by name in `ESTIMATORS`
and never branches on the name. Statistics are computed in float64 and the result has the dtype of
`rewards`.

Estimators: `rloo`, `grpo` (std-normalised group mean), `drgrpo` (group mean, no std) and `js`
(James-Stein shrinkage between the leave-one-out prompt mean and the other prompts' mean, in
`js.py`). Deliberately left out: KL or length shaping (those belong to reward shaping and the loss).
The math is pure (no process groups, no config object), so the caller computes advantages on the
full step's batch, before any reordering into micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from megatron_speed.algorithms.groups import (
    check_group_offsets,
    group_index,
    group_means,
    group_sizes,
    group_variances,
    grouped,
    leave_one_out_means,
    segment_sum,
)
from megatron_speed.algorithms.js import js, js_shrinkage


def rloo(rewards: Tensor, group_offsets: Tensor) -> Tensor:
    """REINFORCE leave-one-out: A_i = r_i - mean of the *other* samples of i's group.

    Equivalent to verl's `r_i * k/(k-1) - mean * k/(k-1)` for a group of size k. No std division.
    A group of size 1 has no other sample to form a baseline from; following verl it gets A = r
    (a zero baseline), which keeps the estimator defined rather than dropping the sample.
    """
    g = grouped(rewards, group_offsets)
    advantages = torch.where(g.sizes[g.index] > 1, g.values - leave_one_out_means(g), g.values)
    return advantages.to(rewards.dtype)


def _centre(g_values: Tensor, means: Tensor, sizes: Tensor, index: Tensor) -> Tensor:
    """r - group mean, with verl's size-1 convention (mean 0, so the sample keeps A = r)."""
    return g_values - torch.where(sizes > 1, means, torch.zeros_like(means))[index]


def grpo(rewards: Tensor, group_offsets: Tensor, *, eps: float = 1e-6, std_unbiased: bool = True) -> Tensor:
    """GRPO: A_i = (r_i - group mean) / (group std + eps), as verl's `compute_grpo_outcome_advantage`.

    The std is unbiased (ddof=1, `torch.std`'s default, as verl) unless `std_unbiased=False`
    (ddof=0, as the JSPO authors' copy). A group of size 1 uses verl's convention mean 0 and std 1,
    so A = r / (1 + eps), whichever `std_unbiased`. An all-equal group gets A = 0.
    """
    if eps < 0:
        raise ValueError(f"grpo eps must be >= 0, got {eps}")
    g = grouped(rewards, group_offsets)
    std = torch.where(g.sizes > 1, group_variances(g, unbiased=std_unbiased).sqrt(),
                      torch.ones_like(g.sums))
    centred = _centre(g.values, group_means(g), g.sizes, g.index)
    return (centred / (std[g.index] + eps)).to(rewards.dtype)


def drgrpo(rewards: Tensor, group_offsets: Tensor) -> Tensor:
    """Dr.GRPO: A_i = r_i - group mean (verl's GRPO with `norm_adv_by_std_in_grpo=False`).

    The mean includes the sample itself, so this baseline is biased by the factor (m-1)/m; that is
    the published estimator, kept as such. A group of size 1 uses verl's mean 0, so A = r.
    """
    g = grouped(rewards, group_offsets)
    return _centre(g.values, group_means(g), g.sizes, g.index).to(rewards.dtype)


def broadcast_to_tokens(advantages: Tensor, response_mask: Tensor) -> Tensor:
    """Per-token advantages [N, T]: each trajectory's scalar on its response tokens, 0 elsewhere."""
    if advantages.dim() != 1 or response_mask.dim() != 2 or response_mask.shape[0] != advantages.shape[0]:
        raise ValueError(f"expected advantages [N] and response_mask [N, T], got "
                         f"{tuple(advantages.shape)} and {tuple(response_mask.shape)}")
    return advantages.unsqueeze(-1) * response_mask.to(advantages.dtype)


# Name -> estimator `f(rewards, group_offsets, **options) -> advantages [N]`.
ESTIMATORS: dict[str, Callable[..., Tensor]] = {
    "rloo": rloo,
    "grpo": grpo,
    "drgrpo": drgrpo,
    "js": js,
}


__all__ = ["ESTIMATORS", "broadcast_to_tokens", "check_group_offsets", "drgrpo", "group_index", "group_sizes",
           "grpo", "js", "js_shrinkage", "rloo", "segment_sum"]
