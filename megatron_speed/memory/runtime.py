"""The engine's memory on a GPU, measured once the actor exists (setup builds the actor first).

vLLM sizes its KV cache as `gpu_memory_utilization` x total memory minus what it finds in use, and
refuses to start unless that much is free. Built after the actor, with `rollout.kv_cache_gib = 0`,
the engine gets `memory.plan.engine_memory` of what is free: at most the configured utilization,
minus the Adam moments the optimizer has yet to allocate and a runtime reserve, passed to vLLM as an
explicit KV-cache size plus the utilization that passes its start-up check.
"""

from __future__ import annotations

import gc
from typing import Any

from megatron_speed.config.base import ConfigError
from megatron_speed.config.schema import RolloutConfig
from megatron_speed.memory.plan import GIB, EngineMemory, ModelShape, engine_memory, engine_workspace_bytes


def measured_engine_memory(rollout: RolloutConfig, hf_config: Any, optimizer: Any, *,
                           max_model_len: int) -> EngineMemory | None:
    """The engine's share on this GPU, or None where vLLM sizes it (CPU, or `rollout.kv_cache_gib` set)."""
    import torch

    if not torch.cuda.is_available() or rollout.kv_cache_gib:
        return None
    from megatron_speed.actor.optimizer import adam_moment_bytes

    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    shape = ModelShape.from_hf(hf_config)
    share = engine_memory(total=total, free=free, pending=adam_moment_bytes(optimizer)[1],
                          engine_weights=shape.total_params() * 2 // rollout.tensor_parallel_size,
                          workspace=engine_workspace_bytes(shape, rollout_tp=rollout.tensor_parallel_size,
                                                           eager=rollout.enforce_eager),
                          utilization=rollout.gpu_memory_utilization)
    check_kv_room(share, shape.kv_bytes_per_token(rollout.tensor_parallel_size), max_model_len=max_model_len,
                  free=free, total=total)
    return share


def check_kv_room(share: EngineMemory, per_token: int, *, max_model_len: int, free: int, total: int) -> None:
    """Stop before vLLM does when the KV cache cannot hold one sequence, naming what to change."""
    if share.kv_cache_bytes >= per_token * max_model_len:
        return
    raise ConfigError("rollout.gpu_memory_utilization", share.utilization,
                      f"leaves a {share.kv_cache_bytes / GIB:.2f} GiB KV cache once the actor holds its part "
                      f"({(total - free) / GIB:.1f} of {total / GIB:.0f} GiB in use), less than one "
                      f"{max_model_len}-token sequence ({per_token * max_model_len / GIB:.2f} GiB)",
                      "see tools/memory_plan.py RECIPE --gpu-memory-gib N for an override that fits "
                      "(e.g. optim.use_distributed_optimizer=true or a larger parallel.tensor_parallel_size)")
