"""LoRA on the Megatron actor (model.lora): base equivalence at B = 0, adapters-only training, merged
and PEFT exports against transformers and peft, adapter-only checkpoints and bit-exact resume.

One process holds a world of one (gloo) and several actors on one tiny random Qwen2 (untied, 2
layers, randomised biases and norms). The TP/PP/DP parity of LoRA is tests/distributed/test_lora_tp.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_speed.config.base import ConfigError
from megatron_speed.config.schema import AlgorithmConfig, LoraConfig, ModelConfig, OptimConfig, ParallelConfig
from megatron_speed.recipes import load_recipe
from tests.tiny_models import tiny_hf_model

LORA = LoraConfig(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_hf_model("qwen2", tmp_path_factory.mktemp("lora") / "qwen2")


def _actor(hf_dir: Path, lora: LoraConfig = LORA, *, kl_coef: float = 0.0, distributed_optimizer: bool = False,
           recompute: str = "none") -> Any:
    from megatron_speed.actor.actor import MegatronActor
    from megatron_speed.parallel import init_parallel

    init_parallel(ParallelConfig(), seed=1)
    return MegatronActor(hf_dir, model_cfg=ModelConfig(lora=lora, recompute=recompute), optim_cfg=OptimConfig(
        lr=1e-2, min_lr=1e-3, micro_batch_size=4, mini_batch_size=8, use_distributed_optimizer=distributed_optimizer),
        algorithm_cfg=AlgorithmConfig(kl_coef=kl_coef), temperature=1.0, horizon=11, total_steps=10)


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (8, 12), generator=gen), torch.ones(8, 11), torch.randn(8, 11, generator=gen)


def _train_step(actor: Any, seed: int) -> dict[str, float]:
    tokens, mask, adv = _batch(seed)
    return actor.train_step(tokens, mask, actor.compute_logprobs(tokens) - 0.01, adv)


def _logits(actor: Any, tokens: torch.Tensor) -> torch.Tensor:
    from megatron_speed.parallel.cpu_support import cpu_megatron

    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    actor.module.eval()
    with torch.no_grad(), cpu_megatron():
        return actor.module(tokens, positions, attention_mask=None)


@pytest.fixture(scope="module")
def trained(hf_dir: Path) -> dict[str, Any]:
    """A LoRA actor before and after three steps, with what each step's gradients touched."""
    actor = _actor(hf_dir)
    params = dict(actor.module.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    grads = []
    for seed in range(3):
        _train_step(actor, seed)
        grads.append({n: p.main_grad.clone() for n, p in params.items() if hasattr(p, "main_grad")})
    return {"actor": actor, "before": before, "grads": grads, "params": params}


def test_zero_initialised_b_gives_the_base_models_logits_exactly(hf_dir: Path) -> None:
    base, lora = _actor(hf_dir, LoraConfig()), _actor(hf_dir)
    tokens, _, _ = _batch(7)
    assert torch.equal(_logits(lora, tokens), _logits(base, tokens))
    assert torch.equal(lora.compute_logprobs(tokens), base.compute_logprobs(tokens))
    a = [p for n, p in lora.module.named_parameters() if ".lora_A." in n]
    assert len(a) == 2 * 7 and all(p.abs().max() > 0 for p in a)  # 7 targets x 2 layers; A is live, B is 0


def test_only_adapters_are_trained(trained: dict[str, Any]) -> None:
    actor, params, before = trained["actor"], trained["params"], trained["before"]
    adapters = {n for n in params if ".lora." in n}
    assert adapters and all(params[n].requires_grad == (n in adapters) for n in params)
    optimized = {id(p) for group in actor.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(params[n]) for n in adapters}  # the base is not in the optimizer
    for step, grads in enumerate(trained["grads"]):
        assert set(grads) == adapters, step  # megatron's grad buffers hold adapters only
        assert all(params[n].grad is None for n in params if n not in adapters)
    # Step 1 starts at B = 0: A gets no gradient yet; from step 2 every adapter does.
    assert all(torch.count_nonzero(g) == 0 for n, g in trained["grads"][0].items() if ".lora_A." in n)
    assert all(g.abs().max() > 0 for g in trained["grads"][2].values())
    for name, param in params.items():
        changed = not torch.equal(param.detach(), before[name])
        assert changed == (name in adapters), name


def test_kl_reference_is_the_base_model(hf_dir: Path, trained: dict[str, Any]) -> None:
    base = _actor(hf_dir, LoraConfig())
    tokens, _, _ = _batch(3)
    actor = trained["actor"]
    assert actor.reference is None  # no second copy of the weights
    assert torch.equal(actor.compute_logprobs(tokens, reference=True), base.compute_logprobs(tokens))
    assert not torch.equal(actor.compute_logprobs(tokens), base.compute_logprobs(tokens))


def test_full_recompute_keeps_the_adapter_gradients(hf_dir: Path) -> None:
    """Reentrant full-layer recomputation drops gradients when no layer input requires grad; the
    frozen embedding's output is marked so the adapters still train (same loss and norm)."""
    plain, recomputed = _actor(hf_dir), _actor(hf_dir, recompute="full")
    for seed in range(2):
        a, b = _train_step(plain, seed), _train_step(recomputed, seed)
        assert b["grad_norm"] > 0
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["grad_norm"] == pytest.approx(a["grad_norm"],
                                                                                                      rel=1e-5)


def _hf_logits(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


def test_merged_export_and_peft_adapter_load_in_transformers_and_peft(hf_dir: Path, trained: dict[str, Any],
                                                                     tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_speed.checkpoint import save_hf_folder, save_peft_folder

    actor = trained["actor"]
    merged_dir = save_hf_folder(tmp_path / "merged", hf_dir, actor.export_hf_weights())
    peft_dir = save_peft_folder(tmp_path / "adapter", actor.export_adapter_weights(), actor.adapter_config())
    assert sorted(p.name for p in peft_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert len(load_file(peft_dir / "adapter_model.safetensors")) == 2 * 2 * 7  # A and B x layers x targets

    tokens, _, _ = _batch(5)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, peft_dir).eval()
    merged_logits, peft_logits = _hf_logits(merged, tokens), _hf_logits(peft_model, tokens)
    assert (peft_logits - merged_logits).abs().max().item() <= 1e-5
    with peft_model.disable_adapter():  # the adapter really changes the model
        assert (_hf_logits(peft_model, tokens) - merged_logits).abs().max().item() > 1e-3
    # ... and the merged export is the policy the actor trains
    logp = torch.log_softmax(merged_logits, dim=-1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    assert (logp - actor.compute_logprobs(tokens)).abs().max().item() <= 1e-5


def test_lora_checkpoint_holds_adapters_only_and_resumes_bit_exact(hf_dir: Path, tmp_path: Path) -> None:
    from megatron.core import dist_checkpointing

    from megatron_speed.checkpoint import layout, resume

    actor = _actor(hf_dir, distributed_optimizer=True)
    _train_step(actor, 0)
    _train_step(actor, 1)
    path = resume.save_checkpoint(tmp_path, 2, actor=actor, hf_src=hf_dir, trainer_state={"step": 2}, keep_last=2,
                                  layout={"world_size": 1, "tp": 1, "pp": 1})
    meta = layout.read_meta(path)
    assert meta["base_model"] == str(hf_dir.resolve()) and meta["lora"]["rank"] == LORA.rank
    assert meta["contents"][0] == "adapters"
    keys = set(dist_checkpointing.load_tensors_metadata(str(path / "megatron")))
    model_keys = {k for k in keys if k.startswith(("decoder.", "embedding.", "output_layer."))}
    assert model_keys and all(".lora." in k for k in model_keys), sorted(model_keys)[:5]
    merged_at_two = dict(actor.export_hf_weights())
    adapters_at_two = {k: v.clone() for k, v in actor.export_adapter_weights()}  # exports alias live params
    after = [_train_step(actor, s) for s in (2, 3)]
    want = actor.compute_logprobs(_batch(9)[0])

    # tools/convert_megatron_to_hf.py: a LoRA checkpoint is merged onto the base its meta names
    from safetensors.torch import load_file

    from megatron_speed.checkpoint.convert import megatron_to_hf

    megatron_to_hf(path, tmp_path / "converted", peft_out=tmp_path / "converted_adapter")
    converted = load_file(tmp_path / "converted" / "model.safetensors")
    assert converted.keys() == merged_at_two.keys()
    assert all(torch.equal(converted[k], merged_at_two[k]) for k in converted)
    adapter = load_file(tmp_path / "converted_adapter" / "adapter_model.safetensors")
    assert adapter.keys() == adapters_at_two.keys()
    assert all(torch.equal(adapter[k], adapters_at_two[k]) for k in adapter)
    assert meta["lora"]["dropout"] == LORA.dropout  # the PEFT config written from a checkpoint keeps it
    converted_config = json.loads((tmp_path / "converted_adapter" / "adapter_config.json").read_text())
    assert converted_config == json.loads(json.dumps(actor.adapter_config()))

    fresh = _actor(hf_dir, distributed_optimizer=True)
    assert resume.load_checkpoint(path, actor=fresh, world_size=1) == {"step": 2}
    assert [_train_step(fresh, s) for s in (2, 3)] == after  # adapters, Adam moments and LR schedule restored
    assert torch.equal(fresh.compute_logprobs(_batch(9)[0]), want)

    with pytest.raises(ConfigError, match=r"model\.lora"):  # adapters need the same LoRA shape ...
        resume.load_checkpoint(path, actor=_actor(hf_dir, LoraConfig(rank=8)), world_size=1)
    with pytest.raises(ConfigError, match=r"model\.lora"):  # ... and a full checkpoint is not a LoRA one
        resume.load_checkpoint(path, actor=_actor(hf_dir, LoraConfig()), world_size=1)


def test_lora_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.lora\.targets .*qproj"):
        load_recipe("toy_cpu", ["model.lora.rank=8", "model.lora.targets=[qproj]"])
    with pytest.raises(ConfigError, match=r"model\.lora\.rank"):
        load_recipe("toy_cpu", ["model.lora.rank=8", "model.attention_backend=te"])
    with pytest.raises(ConfigError, match=r"model\.lora\.dropout"):
        load_recipe("toy_cpu", ["model.lora.dropout=1.5"])
    with pytest.raises(ConfigError, match=r"model\.lora\.refit \('adapter'\).*refit=merged"):
        load_recipe("toy_cpu", ["model.lora.rank=8", "model.lora.refit=adapter", "rollout.placement=disaggregated",
                                "rollout.num_ranks=1"])
    cfg = load_recipe("toy_cpu", ["model.lora.rank=8", "model.lora.targets=[q_proj,v_proj]"])
    assert cfg.model.lora.enabled and cfg.model.lora.scaling == 2.0


def test_lora_on_a_moe_model_adapts_attention_and_rejects_expert_targets(tmp_path: Path) -> None:
    """MoE layers have no dense MLP projection: the MLP targets are a config error naming the fix, and
    the attention-only adapters train while the base (experts, router) stays frozen."""
    moe = tiny_hf_model("qwen3_moe", tmp_path / "moe")
    with pytest.raises(ConfigError, match=r"model\.lora\.targets .*mixture-of-experts.*targets=\[q_proj"):
        _actor(moe)
    actor = _actor(moe, LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj", "o_proj")))
    trainable = {n for n, p in actor.module.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in n and "self_attention" in n for n in trainable), trainable
    before = {n: p.detach().clone() for n, p in actor.module.named_parameters()}
    _train_step(actor, 0)
    _train_step(actor, 1)  # B starts at zero: the second step moves A as well
    moved = {n for n, p in actor.module.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= trainable and any(".experts." in n for n in before)


def _sampled(engine: Any, version: int) -> Any:
    from megatron_speed.curriculum.batch import build_train_batch
    from megatron_speed.records import PromptRecord, SampleRequest

    requests = [SampleRequest(prompt=PromptRecord(uid=str(i), prompt=f" {i}+{3 * i}=", answer="0"), n=4)
                for i in range(4)]
    groups = engine.generate(requests, policy_version=version)
    for g in groups:
        g.rewards = [0.0] * len(g.completions)
    return build_train_batch(groups, pad_id=0)


@pytest.mark.parametrize("refit", ["merged", "adapter"])
def test_refit_makes_vllm_sample_from_the_lora_policy(hf_dir: Path, trained: dict[str, Any], refit: str,
                                                     closing: Any) -> None:
    """Both refits leave vLLM's sampled-token log-probs equal to the LoRA actor's (float32), and
    neither touches the actor's adapters (vLLM folds the scaling into B in place: it gets a copy)."""
    from megatron_speed.config.schema import RolloutConfig
    from megatron_speed.rollout.engine import VLLMEngine

    actor = trained["actor"]
    engine = closing(VLLMEngine(hf_dir, RolloutConfig(n=4, max_new_tokens=8, kv_cache_gib=0.1), max_model_len=64,
                                lora_rank=LORA.rank if refit == "adapter" else 0))
    adapters = {n: p.detach().clone() for n, p in actor.module.named_parameters() if ".lora." in n}
    base = _sampled(engine, 0)
    assert ((actor.compute_logprobs(base.tokens) - base.rollout_logprobs) * base.response_mask).abs().max() > 1e-2
    if refit == "adapter":
        stats = engine.update_adapter(actor.export_adapter_weights(), actor.adapter_config(), version=1)
        assert stats.tensors == 2 * 2 * 7
    else:
        stats = engine.update_weights(actor.export_hf_weights())
    fresh = _sampled(engine, 1)
    diff = ((actor.compute_logprobs(fresh.tokens) - fresh.rollout_logprobs) * fresh.response_mask).abs().max()
    assert diff.item() < 1e-4
    assert all(torch.equal(p.detach(), adapters[n]) for n, p in actor.module.named_parameters() if ".lora." in n)
