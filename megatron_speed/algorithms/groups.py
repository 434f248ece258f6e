"""Per-prompt group bookkeeping shared by the advantage estimators.

A batch holds N trajectories; the trajectories of prompt g are `rewards[group_offsets[g]:group_offsets[g+1]]`
(`group_offsets` is [G+1] int64, non-decreasing, from 0 to N; groups may differ in size and may be
empty). Everything here is vectorised over groups with prefix sums and gathers: no Python loop over
groups, no atomics, so results are deterministic.

Statistics are computed in float64 whatever the reward dtype; estimators cast their result back.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """Sum of `values` [N] over each group, [G], in the dtype of `values`; empty groups sum to 0.

    Scatters the values into a zero-padded float64 [G, max group size] matrix and sums its rows:
    deterministic (every cell written once, no atomics) and free of the cancellation a global
    prefix sum suffers when a group of small values follows groups of large ones. One host sync
    (the largest group size).
    """
    offsets = group_offsets.to(values.device).long()
    sizes = group_sizes(offsets)
    width = int(sizes.max()) if sizes.numel() else 0
    index = group_index(offsets, values.numel())
    position = torch.arange(values.numel(), device=values.device) - offsets[:-1][index]
    dense = torch.zeros(sizes.numel(), max(width, 1), dtype=torch.float64, device=values.device)
    dense[index, position] = values.double()
    return dense.sum(1).to(values.dtype)


@dataclass(frozen=True)
class Grouped:
    """Validated rewards in float64 with their group structure (all on the rewards' device)."""

    values: Tensor  # [N] float64
    offsets: Tensor  # [G+1] int64
    index: Tensor  # [N] int64, the group of each sample
    sizes: Tensor  # [G] int64
    sums: Tensor  # [G] float64


def grouped(rewards: Tensor, group_offsets: Tensor) -> Grouped:
    """Validate `rewards` [N] (floating point) and `group_offsets`, and gather per-group sums."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if not rewards.dtype.is_floating_point:
        raise ValueError(f"rewards must be floating point, got {rewards.dtype}")
    check_group_offsets(group_offsets, rewards.numel())
    offsets = group_offsets.to(rewards.device).long()
    values = rewards.double()
    return Grouped(values=values, offsets=offsets, index=group_index(offsets, values.numel()),
                   sizes=group_sizes(offsets), sums=segment_sum(values, offsets))


def group_means(g: Grouped) -> Tensor:
    """Mean reward of each group, [G] float64; an empty group's mean is 0 (callers mask it out)."""
    return g.sums / g.sizes.clamp(min=1).double()


def group_variances(g: Grouped, *, unbiased: bool) -> Tensor:
    """Sample variance of each group, [G] float64 (ddof=1 if `unbiased`, else ddof=0).

    Two-pass (deviations from the group mean) for accuracy. Where the variance is undefined (an
    empty group, or a size-1 group with `unbiased`) the value is 0; callers that need a convention
    for those groups apply it themselves.
    """
    deviations = g.values - group_means(g)[g.index]
    squares = segment_sum(deviations * deviations, g.offsets)
    dof = g.sizes - 1 if unbiased else g.sizes
    return squares / dof.clamp(min=1).double()


def leave_one_out_means(g: Grouped) -> Tensor:
    """For each sample, the mean of the *other* samples of its group, [N] float64.

    Defined for groups of size >= 2. For a size-1 group there is no other sample; the value is 0
    (the group's sum minus the sample itself, over a count clamped to 1), so it stays finite and
    callers choose the convention.
    """
    sizes = g.sizes[g.index]
    return (g.sums[g.index] - g.values) / (sizes - 1).clamp(min=1).double()


__all__ = ["Grouped", "check_group_offsets", "group_index", "group_means", "group_sizes", "group_variances",
           "grouped", "leave_one_out_means", "segment_sum"]
