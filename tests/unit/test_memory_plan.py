"""The memory plan against megatron-core's and vLLM's own arithmetic, on models and engines built on CPU.

* parameter count, actor weight bytes, the DDP fp32 gradient buffer, the optimizer's fp32 main
  params and Adam moments: the plan vs a tiny qwen2 actor built by megatron-core (bf16 and fp32),
  before and after its first optimizer step (Adam allocates its moments lazily);
* megatron's per-parameter rule (Megatron-LM `theoretical_memory_usage.py`): 18 bytes per parameter
  without the distributed optimizer, 6 + 12/DP with it;
* KV bytes per token: vLLM's `FullAttentionSpec.page_size_bytes`, and the blocks a CPU engine allocates
  for an explicit KV budget;
* the engine's share of what is free once the actor exists, and the CLI's verdict: the override it
  suggests really makes the plan fit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_speed.actor.actor import MegatronActor
from megatron_speed.actor.optimizer import adam_moment_bytes, main_param_bytes
from megatron_speed.config.schema import AlgorithmConfig, ModelConfig, OptimConfig, ParallelConfig, RolloutConfig
from megatron_speed.memory import GIB, KNOWN_SHAPES, ModelShape, PlanInputs, engine_memory, plan
from megatron_speed.memory.plan import optimizer_bytes_per_param
from megatron_speed.parallel import init_parallel
from tests.tiny_models import tiny_hf_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import memory_plan


def inputs_for(**changes: object) -> PlanInputs:
    base = dict(gpus=1, gpu_bytes=80 * GIB, tp=1, pp=1, params_bytes=2, distributed_optimizer=False,
                recompute="none", micro_batch_tokens=64, reference_model=False, entropy=False, rollout_tp=1,
                utilization=0.5, kv_cache_bytes=0, max_model_len=64, concurrent_sequences=8, eager=True,
                refit_bucket_bytes=2**20)
    return PlanInputs(**{**base, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("tie", [True, False])
def test_plan_matches_a_megatron_actor_built_on_cpu(tmp_path: Path, dtype: str, tie: bool) -> None:
    hf_dir = tiny_hf_model("qwen2", tmp_path / "m", tie=tie)
    init_parallel(ParallelConfig(), seed=1)
    actor = MegatronActor(hf_dir, model_cfg=ModelConfig(params_dtype=dtype), optim_cfg=OptimConfig(
        micro_batch_size=4, mini_batch_size=4), algorithm_cfg=AlgorithmConfig(), temperature=1.0, horizon=8,
        total_steps=2)
    from transformers import AutoConfig

    shape = ModelShape.from_hf(AutoConfig.from_pretrained(hf_dir))
    params = list(actor.module.parameters())
    assert shape.total_params() == sum(p.numel() for p in params)
    result = plan(shape, inputs_for(params_bytes=2 if dtype == "bfloat16" else 4))
    assert result.items["actor weights"] == sum(p.numel() * p.element_size() for p in params)
    grad_buffer = sum(b.grad_data.numel() * b.grad_data.element_size() for b in actor.model.buffers)
    assert grad_buffer == pytest.approx(result.items["gradient buffer (fp32)"], rel=2e-3)  # megatron pads buckets
    assert main_param_bytes(actor.optimizer, {id(p) for p in params}) == result.items["optimizer: fp32 main params"]
    assert adam_moment_bytes(actor.optimizer) == (0, result.items["optimizer: Adam moments"])
    tokens = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(4, 9)
    actor.train_step(tokens, mask, actor.compute_logprobs(tokens), torch.randn(4, 1) * mask)
    assert adam_moment_bytes(actor.optimizer) == (result.items["optimizer: Adam moments"], 0)


@pytest.mark.parametrize("dp", [1, 2, 8, 64])
def test_megatron_bytes_per_parameter_rule(dp: int) -> None:
    """bf16 params + fp32 grads + fp32 main params and Adam moments: 18 bytes, or 6 + 12/DP distributed."""
    for distributed, expected in ((False, 18.0), (True, 6 + 12 / dp)):
        built, first_step = optimizer_bytes_per_param(2, distributed, dp)
        assert 2 + 4 + built + first_step == pytest.approx(expected)


@pytest.mark.parametrize("name", sorted(KNOWN_SHAPES))
@pytest.mark.parametrize("tp", [1, 2])
def test_kv_bytes_per_token_match_vllm_spec(name: str, tp: int) -> None:
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    shape = KNOWN_SHAPES[name]
    spec = FullAttentionSpec(block_size=16, num_kv_heads=shape.kv_heads // tp, head_size=shape.head_dim,
                             dtype=torch.bfloat16)
    assert shape.kv_bytes_per_token(tp) == shape.layers * spec.page_size_bytes // 16


def test_kv_tokens_match_the_blocks_a_cpu_engine_allocates(tmp_path: Path, closing: Any) -> None:
    from transformers import AutoConfig

    from megatron_speed.rollout.engine import VLLMEngine

    hf_dir = tiny_hf_model("qwen2", tmp_path / "m")
    engine = closing(VLLMEngine(hf_dir, RolloutConfig(max_new_tokens=4, kv_cache_gib=0.01), max_model_len=64))
    cache = engine.llm.llm_engine.vllm_config.cache_config
    per_token = ModelShape.from_hf(AutoConfig.from_pretrained(hf_dir)).kv_bytes_per_token(1, dtype_bytes=4)
    planned = int(0.01 * GIB) // per_token
    assert cache.num_gpu_blocks * cache.block_size <= planned < (cache.num_gpu_blocks + 1) * cache.block_size


def test_engine_share_leaves_room_for_adam_and_respects_the_utilization_cap() -> None:
    fit = engine_memory(total=80 * GIB, free=50 * GIB, pending=10 * GIB, engine_weights=15 * GIB,
                        workspace=2 * GIB, utilization=0.9, reserve=2 * GIB)
    assert fit.kv_cache_bytes == (50 - 10 - 2 - 15 - 2) * GIB and fit.utilization == pytest.approx(38 / 80)
    capped = engine_memory(total=80 * GIB, free=79 * GIB, pending=0, engine_weights=15 * GIB, workspace=2 * GIB,
                           utilization=0.5, reserve=2 * GIB)
    assert capped.kv_cache_bytes == (40 - 15 - 2) * GIB and capped.utilization == pytest.approx(0.5)
    assert engine_memory(total=80 * GIB, free=20 * GIB, pending=10 * GIB, engine_weights=15 * GIB, workspace=0,
                         utilization=0.9).kv_cache_bytes == 0


def test_the_suggested_override_makes_the_7b_recipe_fit(capsys: pytest.CaptureFixture[str]) -> None:
    recipe, no_recompute = "speed_rloo__qwen2.5-math-7b__dapo17k", "model.recompute=none"
    assert memory_plan.main([recipe, "--gpus", "4", "--gpu-memory-gib", "80"]) == 0  # as configured (recompute)
    capsys.readouterr()
    assert memory_plan.main([recipe, no_recompute, "--gpus", "4", "--gpu-memory-gib", "80"]) == 1
    verdict = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("verdict"))
    fix = verdict.split("fits with: ")[1].split()
    assert memory_plan.main([recipe, no_recompute, *fix, "--gpus", "4", "--gpu-memory-gib", "80"]) == 0
    assert memory_plan.main([recipe, no_recompute, "--gpus", "4", "--gpu-memory-gib", "141"]) == 0
    assert memory_plan.main(["no_such_recipe"]) == 2


def test_engine_gets_the_measured_share_as_explicit_kv_and_utilization() -> None:
    from megatron_speed.memory import EngineMemory
    from megatron_speed.rollout import compat

    share = EngineMemory(kv_cache_bytes=7 * GIB, utilization=0.31)
    kwargs = compat.engine_kwargs(RolloutConfig(gpu_memory_utilization=0.6), max_model_len=64, world_size=1, seed=0,
                                  memory=share)
    assert kwargs["kv_cache_memory_bytes"] == 7 * GIB and kwargs["gpu_memory_utilization"] == 0.31
    plain = compat.engine_kwargs(RolloutConfig(gpu_memory_utilization=0.6), max_model_len=64, world_size=1, seed=0)
    assert "kv_cache_memory_bytes" not in plain and plain["gpu_memory_utilization"] == 0.6


def test_no_room_for_one_sequence_names_the_key_and_the_planner() -> None:
    from megatron_speed.config.base import ConfigError
    from megatron_speed.memory import EngineMemory
    from megatron_speed.memory.runtime import check_kv_room

    check_kv_room(EngineMemory(kv_cache_bytes=4096 * 100, utilization=0.2), 100, max_model_len=4096, free=GIB,
                  total=2 * GIB)
    with pytest.raises(ConfigError, match=r"tools/memory_plan\.py") as info:
        check_kv_room(EngineMemory(kv_cache_bytes=4095 * 100, utilization=0.2), 100, max_model_len=4096, free=GIB,
                      total=2 * GIB)
    assert info.value.key == "rollout.gpu_memory_utilization"


def test_activations_are_given_with_and_without_recompute(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The micro-batch budget's activations and the train phase both ways, whatever the recipe sets; only
    the activations differ between the two train figures, and the configured one is the plan's own."""
    recipe = "speed_rloo__qwen2.5-math-7b__dapo17k"
    for setting in ("none", "full"):
        out = tmp_path / f"{setting}.json"
        memory_plan.main([recipe, f"model.recompute={setting}", "--gpus", "4", "--json", str(out)])
        payload = json.loads(out.read_text())
        both = payload["by_recompute_bytes"]
        assert both["full"]["activations"] < both["none"]["activations"] / 4
        assert both["none"]["train"] - both["full"]["train"] == \
            both["none"]["activations"] - both["full"]["activations"]
        assert both[setting]["activations"] == payload["bytes"]["activations (one micro-batch per stage ahead)"]
        assert both[setting]["train"] == payload["phases_bytes"]["train (engine asleep)"]
        printed = capsys.readouterr().out
        assert f"| model.recompute={setting} (configured) |" in printed
        assert "16384-token micro-batch budget" in printed
