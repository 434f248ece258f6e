"""Data-parallel rollout over the engine replicas of an SPMD world.

Under torchrun every rank holds one shard of a vLLM engine; `rollout.tensor_parallel_size`
consecutive ranks form one engine replica (vLLM's external launcher groups tensor-parallel ranks
this way), so a world of W ranks has W / TP replicas, independent of the actor's TP/PP layout.

Every rank computes the same curriculum plan (same seed, same state). For one generation call:
1. `local_requests`: replica r takes its contiguous share of the plan (all of its TP ranks take the
   same share and call the engine together, as a tensor-parallel engine needs);
2. the replica's leader (its first rank) scores that share, so each group is graded exactly once;
3. `gather`: every rank gets all groups, in the plan's order, with their rewards, and the summed
   grading faults -- so the curriculum sees the same groups on every rank and updates identically.
   What travels are tensors, not pickles: token ids (int64) and log-probs and rewards (float64,
   the engine's Python floats bit for bit) as flat tensors, and the few strings (prompt record,
   response text, finish reason, fault names) as UTF-8 JSON in a uint8 tensor; each is one
   all_gather of sizes and one of the padded data, on the device NCCL needs (CPU under gloo).

Deliberately left out: load balancing by expected length (shares are equal in prompts, not in
tokens) and overlapping the gather with scoring.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from megatron_speed.config.base import ConfigError
from megatron_speed.records import Completion, PromptRecord, RolloutGroup

T = TypeVar("T")


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
    for packed in _from_leaders(layout, _pack_groups(local_groups, faults)):
        replica_groups, replica_faults = _unpack_groups(packed)
        groups += replica_groups
        total.update(replica_faults)
    return groups, dict(total)


@dataclass(frozen=True)
class _Packed:
    """A leader's payload as three flat tensors: ints, floats and UTF-8 JSON bytes."""

    ints: list[int]
    floats: list[float]
    meta: Any


def _pack_groups(groups: list[RolloutGroup], faults: dict[str, float]) -> _Packed:
    ints: list[int] = []
    floats: list[float] = []
    meta: dict[str, Any] = {"faults": faults, "groups": []}
    for g in groups:
        ints += [len(g.prompt_token_ids), *g.prompt_token_ids, len(g.completions), len(g.rewards)]
        floats += list(g.rewards)
        for c in g.completions:
            ints += [len(c.token_ids), *c.token_ids, len(c.logprobs)]
            floats += list(c.logprobs)
        meta["groups"].append({"prompt": dataclasses.asdict(g.prompt), "phase": g.phase,
                               "policy_version": g.policy_version, "texts": [c.text for c in g.completions],
                               "finish": [c.finish_reason for c in g.completions]})
    return _Packed(ints, floats, meta)


def _unpack_groups(packed: _Packed) -> tuple[list[RolloutGroup], dict[str, float]]:
    ints, floats = iter(packed.ints), iter(packed.floats)

    def take(it: Any, n: int) -> list[Any]:
        return [next(it) for _ in range(n)]

    groups = []
    for m in packed.meta["groups"]:
        prompt_ids = tuple(take(ints, next(ints)))
        n, n_rewards = next(ints), next(ints)
        rewards = take(floats, n_rewards)
        completions = []
        for text, finish in zip(m["texts"], m["finish"]):
            token_ids = tuple(take(ints, next(ints)))
            # One engine call generated the whole group: its version is every sample's.
            completions.append(Completion(token_ids=token_ids, logprobs=tuple(take(floats, next(ints))), text=text,
                                          finish_reason=finish, policy_version=m["policy_version"]))
        assert len(completions) == n
        groups.append(RolloutGroup(prompt=PromptRecord(**m["prompt"]), prompt_token_ids=prompt_ids,
                                   completions=completions, phase=m["phase"], policy_version=m["policy_version"],
                                   rewards=rewards))
    return groups, packed.meta["faults"]


def _device() -> torch.device:
    """NCCL moves only device tensors; gloo only host ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_flat(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's 1-D `tensor` (lengths may differ): sizes first, then the data padded to the longest."""
    device = _device()
    size = torch.tensor([tensor.numel()], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    lengths = [int(n) for n in torch.cat(sizes).tolist()]
    if max(lengths) == 0:
        return [tensor.new_empty(0) for _ in lengths]
    padded = torch.zeros(max(lengths), dtype=tensor.dtype, device=device)
    padded[:tensor.numel()] = tensor.to(device)
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded)
    return [part[:n].cpu() for part, n in zip(parts, lengths)]


def _from_leaders(layout: ReplicaLayout, packed: _Packed | None) -> list[_Packed]:
    """Every replica leader's payload, in replica order, on every rank (non-leaders send nothing)."""
    mine = packed if layout.is_leader and packed is not None else _Packed([], [], None)
    ints = _all_gather_flat(torch.tensor(mine.ints, dtype=torch.int64))
    floats = _all_gather_flat(torch.tensor(mine.floats, dtype=torch.float64))
    meta = _all_gather_flat(torch.frombuffer(bytearray(json.dumps(mine.meta).encode()), dtype=torch.uint8))
    out = []
    for replica in range(layout.replicas):
        rank = replica * layout.tp
        part = _Packed(ints[rank].tolist(), floats[rank].tolist(), json.loads(bytes(meta[rank].tolist()).decode()))
        assert part.meta is not None, f"replica {replica}'s leader sent nothing"
        out.append(part)
    return out


def gather_shares(layout: ReplicaLayout, local: list[T]) -> list[T]:
    """Every replica's `local` results (computed on its `share`; JSON values: numbers, strings, lists),
    concatenated in replica order on every rank. Each replica's leader sends; the other ranks of a
    replica computed the same list."""
    if layout.world_size == 1:
        return list(local)
    return [item for part in _from_leaders(layout, _Packed([], [], list(local))) for item in part.meta]
