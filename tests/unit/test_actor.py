"""Megatron actor vs `transformers`, bridge round trip, and vLLM log-prob parity after a refit.

One process holds a world of one (gloo), the Megatron actor and an in-process vLLM engine, exactly
as the toy run does. The model is a tiny random Qwen2 with randomised biases and norm weights so a
wrong QKV or gate/up mapping cannot hide behind zeros and ones.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_speed.actor.actor import MegatronActor, TrainingDiverged
from megatron_speed.config.schema import (
    AlgorithmConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RolloutConfig,
)
from megatron_speed.curriculum.batch import build_train_batch
from megatron_speed.parallel import init_parallel
from megatron_speed.records import PromptRecord, SampleRequest

# Measured on the 2-core CPU (float32): Megatron vs transformers max |diff| 4.8e-7; vLLM vs actor
# after a refit 4.8e-7 typical, up to ~3e-5 on rare low-probability tokens.
HF_TOL = 1e-4
VLLM_TOL = 1e-4


def _tiny_qwen2(path: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_speed.toy.tokenizer import build_toy_tokenizer

    tokenizer = build_toy_tokenizer(path)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=32, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, rms_norm_eps=1e-6, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture(scope="module")
def actor(hf_dir: Path) -> MegatronActor:
    init_parallel(ParallelConfig(), seed=1)
    return MegatronActor(hf_dir, model_cfg=ModelConfig(), optim_cfg=OptimConfig(
        lr=1e-3, min_lr=1e-3, micro_batch_size=8, mini_batch_size=16), algorithm_cfg=AlgorithmConfig(),
        temperature=1.0, horizon=8, total_steps=10)


def _hf_logprobs(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens).logits.float(), dim=-1)
    return logp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]


def test_megatron_logprobs_match_transformers(actor: MegatronActor, hf_dir: Path) -> None:
    tokens = torch.randint(0, 32, (6, 24), generator=torch.Generator().manual_seed(3))
    diff = (actor.compute_logprobs(tokens) - _hf_logprobs(hf_dir, tokens)).abs().max().item()
    assert diff < HF_TOL


def test_bridge_export_is_the_hf_state_dict(actor: MegatronActor, hf_dir: Path) -> None:
    from safetensors.torch import load_file

    hf = load_file(hf_dir / "model.safetensors")
    exported = dict(actor.export_hf_weights())
    assert set(exported) == set(hf)
    for name, tensor in hf.items():
        assert torch.equal(exported[name], tensor), name


def test_refit_makes_vllm_logprobs_match_the_actor(actor: MegatronActor, hf_dir: Path, closing: Any) -> None:
    from megatron_speed.rollout.engine import VLLMEngine

    engine = closing(VLLMEngine(hf_dir, RolloutConfig(n=4, max_new_tokens=8, kv_cache_gib=0.1), max_model_len=64))
    requests = [SampleRequest(prompt=PromptRecord(uid=str(i), prompt=f" {i}+{3 * i}=", answer="0"), n=4)
                for i in range(4)]
    batch = _scored_batch(engine.generate(requests, policy_version=0))
    before = actor.compute_logprobs(batch.tokens)
    adv = torch.randn(batch.num_sequences, 1) * batch.response_mask
    actor.train_step(batch.tokens, batch.response_mask, before, adv * 10)
    after = actor.compute_logprobs(batch.tokens)
    assert ((after - before) * batch.response_mask).abs().max() > 1e-3  # the policy really moved

    engine.update_weights(actor.export_hf_weights())
    fresh = _scored_batch(engine.generate(requests, policy_version=1))
    actor_lp = actor.compute_logprobs(fresh.tokens)
    diff = ((actor_lp - fresh.rollout_logprobs) * fresh.response_mask).abs().max().item()
    assert diff < VLLM_TOL


def _scored_batch(groups):
    for g in groups:
        g.rewards = [0.0] * len(g.completions)
    return build_train_batch(groups, pad_id=0)


def test_nan_loss_stops_before_any_update(actor: MegatronActor) -> None:
    tokens = torch.randint(0, 32, (16, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(16, 11)
    old = actor.compute_logprobs(tokens)
    weights = {n: p.detach().clone() for n, p in actor.module.named_parameters()}
    with pytest.raises(TrainingDiverged, match="loss is nan"):
        actor.train_step(tokens, mask, old, torch.full((16, 11), math.nan))
    for name, p in actor.module.named_parameters():
        assert torch.equal(p.detach(), weights[name]), name


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-sum-norm"])
def test_micro_batch_split_does_not_change_the_gradient(hf_dir: Path, aggregation: str) -> None:
    """16 rows with very uneven response lengths: one micro-batch of 16 vs four of 4 give the same
    gradient through megatron's schedule, because the loss's denominator is summed over all
    micro-batches (and ranks) before megatron divides (verl's per-micro-batch mean would not)."""
    from megatron_speed.actor.actor import _split
    from megatron_speed.parallel.cpu_support import cpu_megatron

    init_parallel(ParallelConfig(), seed=1)
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 32, (16, 14), generator=gen)
    mask = torch.zeros(16, 13)
    for i in range(16):
        mask[i, 3:3 + 1 + (i * 5) % 10] = 1.0  # response lengths 1..10
    adv = torch.randn(16, 1, generator=gen) * mask
    actor = MegatronActor(hf_dir, model_cfg=ModelConfig(), optim_cfg=OptimConfig(micro_batch_size=4,
                          mini_batch_size=16), algorithm_cfg=AlgorithmConfig(loss_aggregation=aggregation),
                          temperature=1.0, horizon=10, total_steps=1)
    old = actor.compute_logprobs(tokens) - 0.1 * mask  # ratios != 1, so clipping is exercised too
    grads = []
    for micro in (16, 4):
        with cpu_megatron():
            actor.model.zero_grad_buffer()
            actor._run_schedule(_split(micro, tokens, mask, old, adv), train=True)
        grads.append({n: p.main_grad.clone() for n, p in actor.module.named_parameters()})
    assert max(g.abs().max().item() for g in grads[0].values()) > 1e-3
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-7, rtol=1e-5), name


def test_kl_penalty_and_entropy_bonus_enter_the_loss(hf_dir: Path) -> None:
    """With kl_coef > 0 a frozen reference model is built; at the first step policy == reference, so
    the KL term is 0, and after an update it is positive. The entropy bonus is reported."""
    init_parallel(ParallelConfig(), seed=1)
    actor = MegatronActor(hf_dir, model_cfg=ModelConfig(), optim_cfg=OptimConfig(
        lr=1e-2, min_lr=1e-2, micro_batch_size=8, mini_batch_size=8),
        algorithm_cfg=AlgorithmConfig(kl_coef=0.1, kl_kind="k3", entropy_coef=0.01), temperature=1.0,
        horizon=8, total_steps=2)
    tokens = torch.randint(0, 32, (8, 12), generator=torch.Generator().manual_seed(9))
    mask = torch.ones(8, 11)
    adv = torch.randn(8, 1, generator=torch.Generator().manual_seed(10)) * mask
    first = actor.train_step(tokens, mask, actor.compute_logprobs(tokens), adv)
    assert first["kl_sum"] == pytest.approx(0.0, abs=1e-5) and first["entropy_sum"] > 0
    second = actor.train_step(tokens, mask, actor.compute_logprobs(tokens), adv)
    assert second["kl_sum"] > 1e-4
    ref = actor.compute_logprobs(tokens, reference=True)
    assert torch.allclose(ref, _hf_logprobs(hf_dir, tokens), atol=HF_TOL)  # the reference stays frozen


# --- dynamic batching and layout validation ---------------------------------------------------------
def _uneven_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """16 right-padded rows whose responses end anywhere from position 4 to 13 of 14."""
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 32, (16, 14), generator=gen)
    mask = torch.zeros(16, 13)
    for i in range(16):
        mask[i, 3:3 + 1 + (i * 7) % 10] = 1.0
    return tokens, mask, torch.randn(16, 1, generator=gen) * mask


def test_token_budget_plan_covers_every_row_once_within_the_budget() -> None:
    from megatron_speed.actor.batching import plan

    lengths = [5, 14, 3, 9, 9, 2, 30, 7, 11, 4]
    groups = plan(lengths, rows_per_micro_batch=4, token_budget=20)
    assert sorted(i for g in groups for i in g) == list(range(10))
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 20 or len(g) == 1  # a 30-token row stands alone
    assert [6] in groups
    assert len(plan(lengths, rows_per_micro_batch=4, token_budget=200, min_micro_batches=4)) == 4
    with pytest.raises(ValueError, match="cannot form"):
        plan([5, 5], rows_per_micro_batch=2, token_budget=0, min_micro_batches=3)


def test_row_lengths_reads_the_mask_with_one_host_copy_not_one_per_row() -> None:
    """Per-row `.item()` calls each synchronise a GPU; the lengths come back in one copy instead."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from megatron_speed.actor.batching import row_lengths

    class ScalarReads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            if func is torch.ops.aten._local_scalar_dense.default:
                ScalarReads.count += 1
            return func(*args, **(kwargs or {}))

    mask = torch.zeros(6, 9)
    for row, last in enumerate((0, 3, 8, 5, 1, 7)):
        mask[row, 1:last + 1] = 1.0
    with ScalarReads():
        lengths = row_lengths(mask, 10, 6)
    assert lengths == [2, 5, 10, 7, 3, 9]
    assert ScalarReads.count == 0


def test_dynamic_batching_gives_the_fixed_micro_batch_gradient(hf_dir: Path) -> None:
    """A 40-token budget packs the uneven rows into trimmed micro-batches of varying shape; the
    gradient equals that of fixed 4-row micro-batches at full length (token-mean stays exact because
    each micro-batch returns (sum, count)), and masked log-probs are unchanged by trimming."""
    from megatron_speed.actor.actor import _split
    from megatron_speed.parallel.cpu_support import cpu_megatron

    init_parallel(ParallelConfig(), seed=1)
    tokens, mask, adv = _uneven_batch()
    actor = MegatronActor(hf_dir, model_cfg=ModelConfig(), optim_cfg=OptimConfig(
        micro_batch_size=4, mini_batch_size=16, micro_batch_tokens=40), algorithm_cfg=AlgorithmConfig(),
        temperature=1.0, horizon=10, total_steps=1)
    old = actor.compute_logprobs(tokens) - 0.1 * mask
    dynamic = actor._micro_batches(tokens, mask, mask, old, adv)
    shapes = {tuple(mb.tokens.shape) for mb in dynamic}
    assert len(shapes) > 2 and all(rows * width <= 40 for rows, width in shapes)
    assert min(width for _, width in shapes) < 14  # trimmed to the longest row
    grads, losses = [], []
    for mbs in (_split(4, tokens, mask, old, adv), dynamic):
        with cpu_megatron():
            actor.model.zero_grad_buffer()
            out = actor._run_schedule(mbs, train=True)
        grads.append({n: p.main_grad.clone() for n, p in actor.module.named_parameters()})
        losses.append(sum(float(o["loss_num"]) for o in out) / sum(float(o["loss_den"]) for o in out))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert max(g.abs().max().item() for g in grads[0].values()) > 1e-3
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-7, rtol=1e-5), name
    trimmed = actor.compute_logprobs(tokens, mask=mask)
    assert torch.allclose(trimmed * mask, (old + 0.1 * mask) * mask, atol=1e-5)


def test_parallel_layout_errors_name_the_key(hf_dir: Path) -> None:
    from transformers import AutoConfig

    from megatron_speed.actor.actor import _check_layout
    from megatron_speed.config.base import ConfigError

    with pytest.raises(ConfigError, match=r"virtual_pipeline_parallel_size \(2\) needs pipeline parallelism"):
        ParallelConfig(virtual_pipeline_parallel_size=2)  # a section alone; the loader adds "parallel."
    with pytest.raises(ConfigError, match=r"micro_batch_tokens \(-1\)"):
        OptimConfig(micro_batch_tokens=-1)
    two_layers = AutoConfig.from_pretrained(hf_dir)
    with pytest.raises(ConfigError, match=r"parallel\.virtual_pipeline_parallel_size .*divide the model's 2 layers"):
        _check_layout(two_layers, 2, 2)
    with pytest.raises(ConfigError, match=r"parallel\.pipeline_parallel_size"):
        _check_layout(two_layers, 4, 1)
    assert _check_layout(two_layers, 2, 1) == (1, 1)


def test_token_logprobs_leave_one_row_float32_logits_untouched() -> None:
    """megatron's cross entropy works in place; with one row at temperature 1.0 the shifted logits are a
    view of the model's own float32 logits, so the log-probs must be taken from a copy."""
    from megatron_speed.actor.logprobs import token_logprobs

    init_parallel(ParallelConfig(), seed=1)
    logits = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 32, (1, 6), generator=torch.Generator().manual_seed(1))
    before = logits.clone()
    logp = token_logprobs(logits, tokens)
    expected = torch.log_softmax(before[:, :-1], dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]
    assert torch.equal(logits, before)
    assert torch.allclose(logp, expected, atol=1e-6)


def test_entropy_bonus_is_the_same_with_one_row_micro_batches(hf_dir: Path) -> None:
    """Entropy stat and gradient with one-row micro-batches equal those of one 8-row micro-batch
    (entropy_coef > 0, temperature 1.0, float32: the case where the logits were modified in place)."""
    from megatron_speed.actor.actor import _split
    from megatron_speed.parallel.cpu_support import cpu_megatron

    init_parallel(ParallelConfig(), seed=1)
    actor = MegatronActor(hf_dir, model_cfg=ModelConfig(), optim_cfg=OptimConfig(micro_batch_size=1,
                          mini_batch_size=8), algorithm_cfg=AlgorithmConfig(entropy_coef=0.5), temperature=1.0,
                          horizon=11, total_steps=1)
    tokens = torch.randint(0, 32, (8, 12), generator=torch.Generator().manual_seed(9))
    mask = torch.ones(8, 11)
    adv = torch.randn(8, 1, generator=torch.Generator().manual_seed(10)) * mask
    old = actor.compute_logprobs(tokens)
    entropy, grads = [], []
    for micro in (8, 1):
        with cpu_megatron():
            actor.model.zero_grad_buffer()
            out = actor._run_schedule(_split(micro, tokens, mask, old, adv), train=True)
        entropy.append(sum(float(o["entropy_sum"]) for o in out))
        grads.append({n: p.main_grad.clone() for n, p in actor.module.named_parameters()})
    assert entropy[0] > 8 * 11 * 0.5  # near log(32) per token for a random model, far from 0
    assert entropy[1] == pytest.approx(entropy[0], rel=1e-5)
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-6, rtol=1e-4), name


def test_uneven_pipeline_stages_validate_with_dotted_keys() -> None:
    """megatron-core's uneven split: the end stages' sizes, the middle stages share the rest equally."""
    from megatron_speed.config.base import ConfigError
    from megatron_speed.recipes import load_recipe

    qwen3_4b = ParallelConfig(pipeline_parallel_size=8, num_layers_in_first_pipeline_stage=3,
                              num_layers_in_last_pipeline_stage=3)
    assert qwen3_4b.layers_per_stage(36) == (3, 5, 5, 5, 5, 5, 5, 3)
    assert ParallelConfig(pipeline_parallel_size=4, num_layers_in_last_pipeline_stage=1).layers_per_stage(7) == \
        (2, 2, 2, 1)
    assert ParallelConfig(pipeline_parallel_size=2, num_layers_in_first_pipeline_stage=1).layers_per_stage(3) == (1, 2)
    with pytest.raises(ConfigError, match=r"^parallel\.pipeline_parallel_size \(8\) .*36 layers.*"
                                          r"e\.g\. parallel\.num_layers_in_first_pipeline_stage=3 "
                                          r"parallel\.num_layers_in_last_pipeline_stage=3$"):
        ParallelConfig(pipeline_parallel_size=8).layers_per_stage(36)
    with pytest.raises(ConfigError, match=r"^parallel\.num_layers_in_first_pipeline_stage \(2\) leaves 34 of the "
                                          r"model's 36 layers for 7 other pipeline stage\(s\)"):
        ParallelConfig(pipeline_parallel_size=8, num_layers_in_first_pipeline_stage=2).layers_per_stage(36)
    with pytest.raises(ConfigError, match=r"leaves 0 of the model's 3 layers for 1 other"):
        ParallelConfig(pipeline_parallel_size=2, num_layers_in_last_pipeline_stage=3).layers_per_stage(3)
    for override, rule in (("parallel.num_layers_in_first_pipeline_stage=0", "must be >= 1"),
                           ("parallel.num_layers_in_last_pipeline_stage=2", "needs pipeline parallelism")):
        with pytest.raises(ConfigError, match=rf"^{override.split('=')[0]} .*{rule}"):
            load_recipe("toy_cpu", [override])
    vpp2 = ["parallel.pipeline_parallel_size=2", "parallel.virtual_pipeline_parallel_size=2"]
    with pytest.raises(ConfigError, match=r"^parallel\.num_layers_in_first_pipeline_stage \(1\) must be a multiple "
                                          r"of virtual_pipeline_parallel_size \(2\)"):
        load_recipe("toy_cpu", [*vpp2, "parallel.num_layers_in_first_pipeline_stage=1"])
    with pytest.raises(ConfigError, match=r"^parallel\.num_layers_in_last_pipeline_stage \(2\) cannot be set together"):
        load_recipe("toy_cpu", [*vpp2, "parallel.num_layers_in_first_pipeline_stage=2",
                                "parallel.num_layers_in_last_pipeline_stage=2"])
    with_vpp = load_recipe("toy_cpu", [*vpp2, "parallel.num_layers_in_first_pipeline_stage=2"]).parallel
    assert with_vpp.layers_per_stage(6) == (2, 4)
    with pytest.raises(ConfigError, match=r"leaves 3 of the model's 5 layers for 1 other .*positive multiple of 2"):
        with_vpp.layers_per_stage(5)
    assert load_recipe("toy_cpu", ["parallel.pipeline_parallel_size=2", "parallel.num_layers_in_first_pipeline_stage=1"]
                       ).parallel.layers_per_stage(3) == (1, 2)
