"""The one place that builds process groups: torch.distributed plus megatron-core's parallel_state.

Everything else asks `ParallelDims` (or megatron's parallel_state, which this module initialises)
for ranks and groups and never calls `torch.distributed.init_process_group` itself. Under torchrun
the world comes from the environment; a plain `python` process becomes a world of one. The backend
is NCCL when CUDA is present and gloo otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_speed.config.base import ConfigError
from megatron_speed.config.schema import ParallelConfig
from megatron_speed.parallel.cpu_support import cpu_megatron
from megatron_speed.parallel.spanning import Spanning, split_world


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    rank: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    backend: str
    vpp: int = 1  # virtual pipeline chunks per stage
    cp: int = 1  # context-parallel ranks (one sequence's chunks); data parallelism is world / (tp x pp x cp)
    ep: int = 1  # expert-parallel ranks (MoE); they are data-parallel ranks for the dense layers
    # Disaggregated placement: this rank's side ("trainer" | "engine") and the channels spanning both
    # sides; `world_size`/`rank` (and tp/pp/dp) then describe this side's own world. None = colocated.
    spanning: Spanning | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0 of the whole run (a trainer rank when disaggregated): logs, checkpoints, exports."""
        return self.global_rank == 0

    @property
    def global_rank(self) -> int:
        """This process's rank in the whole torchrun world (= `rank` when colocated)."""
        return self.spanning.global_rank if self.spanning is not None else self.rank

    @property
    def role(self) -> str:
        """"colocated" (actor and engine on this rank), "trainer" or "engine"."""
        if self.spanning is None:
            return "colocated"
        return "engine" if self.spanning.is_engine else "trainer"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_parallel(cfg: ParallelConfig, *, seed: int, engine_ranks: int = 0) -> ParallelDims:
    """Initialise torch.distributed (if needed) and megatron's model-parallel groups.

    `engine_ranks` > 0 (rollout.placement=disaggregated): the world splits into trainer ranks, which
    get megatron's groups, and that many engine ranks, which get none (`spanning.py`)."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if engine_ranks:
        spanning, side_rank, side_world = split_world(engine_ranks, backend)
        if spanning.is_engine:
            return ParallelDims(world_size=side_world, rank=side_rank, local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                                tp=1, pp=1, dp=side_world, backend=backend, spanning=spanning)
        return dataclasses.replace(_init_megatron(cfg, seed=seed, backend=backend), spanning=spanning)
    return _init_megatron(cfg, seed=seed, backend=backend)


def _init_megatron(cfg: ParallelConfig, *, seed: int, backend: str) -> ParallelDims:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        # The world these groups belonged to was destroyed (a vLLM engine shutting down in this process
        # tears down the torch.distributed world it joined): forget them and build afresh.
        parallel_state.destroy_model_parallel()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, rank=rank, world_size=world)
    world = dist.get_world_size()
    model_parallel = cfg.tensor_parallel_size * cfg.pipeline_parallel_size * cfg.context_parallel_size
    _require_divides(world, model_parallel, "parallel.tensor_parallel_size", cfg.tensor_parallel_size,
                     f"x pipeline_parallel_size ({cfg.pipeline_parallel_size}) x context_parallel_size "
                     f"({cfg.context_parallel_size})", "change the parallel sizes or the number of processes")
    _require_divides(world, cfg.expert_parallel_size * cfg.expert_tp * cfg.pipeline_parallel_size,
                     "parallel.expert_parallel_size", cfg.expert_parallel_size,
                     f"x expert tensor-parallel size ({cfg.expert_tp}) x pipeline_parallel_size "
                     f"({cfg.pipeline_parallel_size})", "change the expert parallel sizes or the number of processes")
    with cpu_megatron():
        if parallel_state.model_parallel_is_initialized() and _layout() != _wanted(cfg):
            parallel_state.destroy_model_parallel()  # a different layout in the same world: rebuild the groups
        if not parallel_state.model_parallel_is_initialized():
            vpp = cfg.virtual_pipeline_parallel_size
            parallel_state.initialize_model_parallel(cfg.tensor_parallel_size, cfg.pipeline_parallel_size,
                                                     virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
                                                     context_parallel_size=cfg.context_parallel_size,
                                                     expert_model_parallel_size=cfg.expert_parallel_size,
                                                     expert_tensor_parallel_size=cfg.expert_tp)
        model_parallel_cuda_manual_seed(seed)
    return ParallelDims(world_size=world, rank=dist.get_rank(),
                        local_rank=int(os.environ.get("LOCAL_RANK", 0)), tp=cfg.tensor_parallel_size,
                        pp=cfg.pipeline_parallel_size, dp=world // model_parallel, backend=backend,
                        vpp=cfg.virtual_pipeline_parallel_size, cp=cfg.context_parallel_size,
                        ep=cfg.expert_parallel_size)


def _require_divides(world: int, grid: int, key: str, value: int, factors: str, fix: str) -> None:
    """ConfigError naming `key` unless the process grid `grid` (`value` `factors`) divides the world."""
    if world % grid:
        raise ConfigError(key, value, f"{factors} must divide the world size ({world})", fix)


def _layout() -> tuple[int, ...]:
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
            ps.get_virtual_pipeline_model_parallel_world_size() or 1, ps.get_context_parallel_world_size(),
            ps.get_expert_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size())


def _wanted(cfg: ParallelConfig) -> tuple[int, ...]:
    return (cfg.tensor_parallel_size, cfg.pipeline_parallel_size, cfg.virtual_pipeline_parallel_size,
            cfg.context_parallel_size, cfg.expert_parallel_size, cfg.expert_tp)


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
