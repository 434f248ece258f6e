"""Data-parallel rollout over the engine replicas of an SPMD world.

Under torchrun every rank holds one shard of a vLLM engine; `rollout.tensor_parallel_size`
consecutive ranks form one engine replica (vLLM's external launcher groups tensor-parallel ranks
this way), so a world of W ranks has W / TP replicas, independent of the actor's TP/PP layout.

Every rank computes the same curriculum plan (same seed, same state). For one generation call:
1. `local_requests`: replica r takes its contiguous share of the plan (all of its TP ranks take the
   same share and call the engine together, as a tensor-parallel engine needs);
2. the replica's leader (its first rank) scores that share, so each group is graded exactly once;
3. `gather`: one `all_gather_object` over the world gives every rank all groups, in the plan's
   order, with their rewards, and the summed grading faults -- so the curriculum sees the same
   groups on every rank and updates identically.

Deliberately left out: load balancing by expected length (shares are equal in prompts, not in
tokens) and overlapping the gather with scoring.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch.distributed as dist

from megatron_speed.config.base import ConfigError
from megatron_speed.records import RolloutGroup

T = TypeVar("T")
P = TypeVar("P")


@dataclass(frozen=True)
class ReplicaLayout:
    """Which engine replica this rank serves, and whether it speaks for it."""

    world_size: int
    rank: int
    tp: int

    def __post_init__(self) -> None:
        if self.tp < 1 or self.world_size % self.tp:
            raise ConfigError("rollout.tensor_parallel_size", self.tp,
                              f"must divide the number of processes ({self.world_size})",
                              "pick a rollout tensor-parallel size that divides the world, e.g. 1")

    @property
    def replicas(self) -> int:
        return self.world_size // self.tp

    @property
    def replica(self) -> int:
        return self.rank // self.tp

    @property
    def is_leader(self) -> bool:
        return self.rank % self.tp == 0

    def share(self, total: int, replica: int | None = None) -> slice:
        """Contiguous slice of `total` items for `replica` (default: ours); the first `total % R`
        replicas take one extra item."""
        r = self.replica if replica is None else replica
        base, extra = divmod(total, self.replicas)
        start = r * base + min(r, extra)
        return slice(start, start + base + (1 if r < extra else 0))

    def local(self, items: Sequence[T]) -> list[T]:
        return list(items[self.share(len(items))])


def score_and_gather(layout: ReplicaLayout, local_groups: list[RolloutGroup],
                     score: Callable[[list[RolloutGroup]], dict[str, float]]
                     ) -> tuple[list[RolloutGroup], dict[str, float]]:
    """Score this replica's groups on its leader, then share all groups with every rank.

    Returns the groups of the whole call in the plan's order (replica 0's share first) and the
    grading-fault counts summed over replicas. A world of one skips the collective.
    """
    faults = score(local_groups) if layout.is_leader else {}
    if layout.world_size == 1:
        return local_groups, faults
    groups: list[RolloutGroup] = []
    total: Counter[str] = Counter()
    for replica_groups, replica_faults in _from_leaders(layout, (local_groups, faults)):
        groups += replica_groups
        total.update(replica_faults)
    return groups, dict(total)


def _from_leaders(layout: ReplicaLayout, payload: P) -> list[P]:
    """Every replica leader's `payload`, in replica order, on every rank (one all_gather_object)."""
    gathered: list[P | None] = [None] * layout.world_size
    dist.all_gather_object(gathered, payload if layout.is_leader else None)
    out = []
    for replica in range(layout.replicas):
        part = gathered[replica * layout.tp]
        assert part is not None, f"replica {replica}'s leader sent nothing"
        out.append(part)
    return out


def gather_shares(layout: ReplicaLayout, local: list[T]) -> list[T]:
    """Every replica's `local` results (computed on its `share`), concatenated in replica order on every
    rank. Each replica's leader sends; the other ranks of a replica computed the same list."""
    if layout.world_size == 1:
        return list(local)
    return [item for part in _from_leaders(layout, list(local)) for item in part]
