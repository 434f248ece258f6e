"""The GPU engine path (vllm 0.25.1, sleep mode on): level-2 sleep frees memory, and the trainer's
sleep -> wake(weights) -> bucketed refit -> wake(kv_cache) sequence leaves an engine that samples
from the NEW weights. The CPU tests run the same calls with sleep as a no-op; this is where the
freed-memory and discarded-weights half is checked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_speed.config.schema import RolloutConfig
from megatron_speed.records import PromptRecord, SampleRequest
from tests.unit.test_actor import _tiny_qwen2
from tests.unit.test_rollout import _hf_sampled_logprobs, _perturbed

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (vLLM sleep mode)")]

# The engine runs bf16 on the GPU and the reference float32: a few 1e-2 on sampled-token log-probs.
BF16_TOL = 0.1


def test_sleep_then_bucketed_refit_samples_from_the_new_weights(tmp_path: Path) -> None:
    from megatron_speed.rollout.engine import VLLMEngine

    hf_dir = _tiny_qwen2(tmp_path / "model")
    moved_dir, moved = _perturbed(hf_dir, tmp_path / "moved")
    engine = VLLMEngine(hf_dir, RolloutConfig(n=4, max_new_tokens=8, kv_cache_gib=0.5, refit_bucket_mb=1 / 16),
                        max_model_len=64)
    requests = [SampleRequest(prompt=PromptRecord(uid=str(i), prompt=f" {i}+{2 * i}=", answer="0"), n=4)
                for i in range(4)]
    engine.generate(requests, policy_version=0)

    free_awake = torch.cuda.mem_get_info()[0]
    engine.sleep()
    assert torch.cuda.mem_get_info()[0] - free_awake > 0.4 * 2**30  # the 0.5 GiB KV cache went back
    engine.wake_up(["weights"])
    stats = engine.update_weights(iter(moved.items()))
    engine.wake_up(["kv_cache"])
    assert stats.buckets > 5 and stats.tensors == len(moved)

    after = engine.generate(requests, policy_version=1)
    engine_lp = [torch.tensor(c.logprobs) for g in after for c in g.completions]
    new = max((a - b).abs().max().item() for a, b in zip(engine_lp, _hf_sampled_logprobs(moved_dir, after)))
    old = max((a - b).abs().max().item() for a, b in zip(engine_lp, _hf_sampled_logprobs(hf_dir, after)))
    assert new < BF16_TOL < 10 * BF16_TOL < old


def test_wake_up_succeeds_when_the_trainer_left_the_memory_in_pytorchs_cache(tmp_path: Path) -> None:
    """vLLM 0.25.1 maps fresh memory at wake-up and cannot reuse PyTorch's cached blocks. A train step
    leaves nearly all free memory cached (here: one freed tensor as large as what is free, minus
    256 MiB); both wakes must still succeed because the engine returns the cache to the device first."""
    from megatron_speed.rollout.engine import VLLMEngine

    hf_dir = _tiny_qwen2(tmp_path / "model")
    engine = VLLMEngine(hf_dir, RolloutConfig(n=2, max_new_tokens=4, kv_cache_gib=0.5), max_model_len=64)
    engine.sleep()
    cached = torch.empty(torch.cuda.mem_get_info()[0] - 256 * 2**20, dtype=torch.uint8, device="cuda")
    del cached  # freed to PyTorch's caching allocator, not to the device
    assert torch.cuda.memory_reserved() > torch.cuda.mem_get_info()[0]
    engine.wake_up(["weights"])
    engine.update_weights(iter(_perturbed(hf_dir, tmp_path / "moved")[1].items()))
    engine.wake_up(["kv_cache"])
    request = [SampleRequest(prompt=PromptRecord(uid="0", prompt=" 1+2=", answer="3"), n=2)]
    assert len(engine.generate(request, policy_version=1)[0].completions) == 2
