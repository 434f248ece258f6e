"""A disaggregated world: trainer ranks and engine ranks, each with a world of its own, and what spans both.

torchrun starts W processes; the last K (`rollout.num_ranks`) run the engines, the first W - K the
actor. Megatron and vLLM both build their groups over `torch.distributed`'s default world (megatron's
`initialize_model_parallel` splits `get_world_size()` ranks into TP/PP/DP; vLLM's external launcher
makes its TP groups over the same world), and `new_group` is collective over that whole world. So each
side gets a default world of its own (`init_process_group` on a `PrefixStore` of torchrun's store),
in which megatron, or vLLM, builds its groups undisturbed, and two things span the sides:

* `store`, the rendezvous `TCPStore`, as a mailbox: the engine leader posts finished training
  batches and evaluation reports under numbered keys and the trainer reads them; the trainer posts
  its requests (weights ready, evaluate version v, stop). Keys are written once and read by key,
  never collectively, so the two sides need not agree on an order of messages.
* `weights`, a process group over the trainer leader (global rank 0) and the K engine ranks, for the
  bucketed weight broadcast (`rollout/transfer.py`): NCCL on GPU, gloo on CPU. It is built directly
  from the store (`ProcessGroupGloo` / `ProcessGroupNCCL`), not with `new_group`, because it spans two
  default worlds. The other trainer ranks are not in it: they take part in the export (a collective
  among the trainer ranks) and drop what they gathered.
"""

from __future__ import annotations

import datetime
import os
import pickle
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class Spanning:
    """Roles and cross-side channels of a disaggregated world (built by `init_parallel`)."""

    store: Any  # torch.distributed.Store
    weights: Any | None  # ProcessGroup over [trainer leader, engine ranks]; None on the other trainer ranks
    global_rank: int
    global_world: int
    engine_ranks: int
    backend: str

    @property
    def trainer_ranks(self) -> int:
        return self.global_world - self.engine_ranks

    @property
    def is_engine(self) -> bool:
        return self.global_rank >= self.trainer_ranks

    @property
    def is_engine_leader(self) -> bool:
        return self.global_rank == self.trainer_ranks

    @property
    def weights_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    # --- the mailbox ---------------------------------------------------------------------------
    def post(self, key: str, value: Any) -> None:
        self.store.set(key, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))

    def has(self, key: str) -> bool:
        return bool(self.store.check([key]))

    def take(self, key: str) -> Any:
        """The value posted under `key`, waiting for it (the store's own timeout applies)."""
        value = pickle.loads(self.store.get(key))
        return value

    def wait_any(self, keys: list[str], poll: float = 0.002) -> str:
        """The first of `keys` that is posted (polled: a store wait cannot say which key arrived)."""
        while True:
            for key in keys:
                if self.has(key):
                    return key
            time.sleep(poll)

    def barrier(self, name: str) -> None:
        """Every rank of both sides reaches this point (a counter in the store)."""
        key = f"barrier/{name}"
        self.store.add(key, 1)
        while int(self.store.add(key, 0)) < self.global_world:
            time.sleep(0.01)


def split_world(engine_ranks: int, backend: str) -> tuple[Spanning, int, int]:
    """Join torchrun's rendezvous, give this rank's side its own default world, and build the weights
    group. Returns (spanning, side rank, side world size)."""
    store, rank, world = next(dist.rendezvous("env://", timeout=TIMEOUT))
    store.set_timeout(TIMEOUT)
    trainers = world - engine_ranks
    if trainers < 1:
        from megatron_speed.config.base import ConfigError

        raise ConfigError("rollout.num_ranks", engine_ranks, f"leaves no trainer rank in a world of {world}",
                          f"start more processes (e.g. --nproc {engine_ranks + 1}) or lower rollout.num_ranks")
    engine = rank >= trainers
    side, side_rank, side_world = ("engine", rank - trainers, engine_ranks) if engine else ("trainer", rank, trainers)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, store=dist.PrefixStore(f"{side}/", store), rank=side_rank,
                            world_size=side_world, timeout=TIMEOUT)
    # vLLM's external launcher reads its rank and world from these; they now name this side's world.
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(side_rank), str(side_world)
    members = [0, *range(trainers, world)]
    weights = _group(dist.PrefixStore("weights/", store), members.index(rank), len(members), backend) \
        if rank in members else None
    return Spanning(store=store, weights=weights, global_rank=rank, global_world=world, engine_ranks=engine_ranks,
                    backend=backend), side_rank, side_world


def _group(store: Any, rank: int, size: int, backend: str) -> Any:
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, size)
    return dist.ProcessGroupGloo(store, rank, size, TIMEOUT)
