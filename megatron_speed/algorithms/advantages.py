"""Advantage estimators: per-trajectory advantages from scalar rewards grouped by prompt.

Every estimator has the signature `f(rewards, group_offsets, **options) -> advantages`:
`rewards` is a float tensor [N] with one scalar per trajectory, and the trajectories of prompt g
are `rewards[group_offsets[g]:group_offsets[g+1]]` (`group_offsets` is [G+1] int64, starting at 0
and ending at N; groups may differ in size). Options are estimator-specific keyword arguments; the
trainer looks the estimator up by name in `ESTIMATORS` and never branches on the name.

Deliberately left out: std normalisation and any KL or length shaping; those belong to other
estimators or to reward shaping. The math is pure (no process groups, no config object), so the
caller computes advantages on the full step's batch, before any reordering into micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def check_group_offsets(group_offsets: Tensor, num_samples: int) -> None:
    """Raise ValueError unless `group_offsets` is a non-decreasing [G+1] int tensor from 0 to N.

    Reads a few values back to the host (one device sync); offsets are small and built on the host.
    """
    if group_offsets.dim() != 1 or group_offsets.numel() < 1:
        raise ValueError(f"group_offsets must be a 1-D tensor [G+1], got shape {tuple(group_offsets.shape)}")
    if group_offsets.dtype.is_floating_point or group_offsets.dtype == torch.bool:
        raise ValueError(f"group_offsets must hold integers, got {group_offsets.dtype}")
    first, last = int(group_offsets[0]), int(group_offsets[-1])
    if first != 0 or last != num_samples:
        raise ValueError(f"group_offsets must run from 0 to N={num_samples}, got {first}..{last}")
    if bool((group_offsets[1:] < group_offsets[:-1]).any()):
        raise ValueError("group_offsets must be non-decreasing")


def group_sizes(group_offsets: Tensor) -> Tensor:
    """The number of samples in each group, [G] int64."""
    return (group_offsets[1:] - group_offsets[:-1]).long()


def group_index(group_offsets: Tensor, num_samples: int) -> Tensor:
    """For each sample, the index of its group, [N] int64 (e.g. offsets [0,3,5,6] -> [0,0,0,1,1,2])."""
    groups = torch.arange(group_offsets.numel() - 1, device=group_offsets.device)
    return torch.repeat_interleave(groups, group_sizes(group_offsets), output_size=num_samples)


def segment_sum(values: Tensor, group_offsets: Tensor) -> Tensor:
    """Sum of `values` [N] over each group, [G], in the dtype of `values`.

    Uses a float64 prefix sum so the result is deterministic (no atomics) and exact enough for any
    realistic batch; empty groups sum to 0.
    """
    prefix = torch.zeros(values.numel() + 1, dtype=torch.float64, device=values.device)
    prefix[1:] = torch.cumsum(values.double(), dim=0)
    offsets = group_offsets.to(values.device).long()
    return (prefix[offsets[1:]] - prefix[offsets[:-1]]).to(values.dtype)


def rloo(rewards: Tensor, group_offsets: Tensor) -> Tensor:
    """REINFORCE leave-one-out: A_i = r_i - mean of the *other* samples of i's group.

    Equivalent to verl's `r_i * k/(k-1) - mean * k/(k-1)` for a group of size k. No std division.
    A group of size 1 has no other sample to form a baseline from; following verl it gets A = r
    (a zero baseline), which keeps the estimator defined rather than dropping the sample.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    check_group_offsets(group_offsets, rewards.numel())
    index = group_index(group_offsets.to(rewards.device), rewards.numel())
    sums = segment_sum(rewards, group_offsets)[index]
    sizes = group_sizes(group_offsets.to(rewards.device))[index].to(rewards.dtype)
    others_mean = (sums - rewards) / (sizes - 1).clamp(min=1)
    return torch.where(sizes > 1, rewards - others_mean, rewards)


def broadcast_to_tokens(advantages: Tensor, response_mask: Tensor) -> Tensor:
    """Per-token advantages [N, T]: each trajectory's scalar on its response tokens, 0 elsewhere."""
    if advantages.dim() != 1 or response_mask.dim() != 2 or response_mask.shape[0] != advantages.shape[0]:
        raise ValueError(f"expected advantages [N] and response_mask [N, T], got "
                         f"{tuple(advantages.shape)} and {tuple(response_mask.shape)}")
    return advantages.unsqueeze(-1) * response_mask.to(advantages.dtype)


# Name -> estimator `f(rewards, group_offsets, **options) -> advantages [N]`.
ESTIMATORS: dict[str, Callable[..., Tensor]] = {
    "rloo": rloo,
}


__all__ = ["ESTIMATORS", "broadcast_to_tokens", "check_group_offsets", "group_index", "group_sizes", "rloo",
           "segment_sum"]
