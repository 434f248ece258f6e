"""Model families through the builder and the bridge: qwen2 (tied, untied), llama (Llama-3 RoPE
scaling), qwen3 (q/k norm, head_dim != hidden / heads).

For each family a tiny random HF folder is loaded into a Megatron GPTModel through the family's
mapping (TP=1, one process), then:
* its logits equal transformers' (float32) with both the SDPA and megatron's local core attention;
* exporting it back through the mapping gives the HF state dict bit for bit.
Errors for what the builder cannot reproduce are checked too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_speed.actor.model import build_gpt_model
from megatron_speed.bridge import mapping_for
from megatron_speed.config.base import ConfigError
from megatron_speed.config.schema import ParallelConfig
from megatron_speed.parallel import init_parallel
from megatron_speed.parallel.cpu_support import cpu_megatron
from tests.tiny_models import tiny_hf_config, tiny_hf_model

# Measured (2-core CPU, float32, 3 x 40 tokens): SDPA 0.0 (transformers runs SDPA too), local
# DotProductAttention up to 1.6e-6.
LOGIT_TOL = 1e-4
SEQ = 40  # > the tiny llama's original_max_position_embeddings (32): scaled RoPE bands matter
CASES = {"qwen2-tied": ("qwen2", True), "qwen2-untied": ("qwen2", False), "llama": ("llama", False),
         "qwen3": ("qwen3", False)}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {case: tiny_hf_model(fam, root / case, tie=tie, tokenizer=False) for case, (fam, tie) in CASES.items()}


def _hf_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def _megatron_from_hf(path: Path, backend: str = "sdpa") -> tuple[Any, Any]:
    """(GPTModel holding the HF weights, HF config), loaded through the family mapping."""
    from transformers import AutoConfig

    init_parallel(ParallelConfig(), seed=1)
    cfg = AutoConfig.from_pretrained(path)
    with cpu_megatron():
        model = build_gpt_model(cfg, params_dtype=torch.float32, attention_backend=backend)
    params = dict(model.named_parameters())
    loaded = dict(mapping_for(cfg).from_hf(params, _hf_state(path)))
    assert set(loaded) == set(params)
    with torch.no_grad():
        for name, tensor in loaded.items():
            params[name].copy_(tensor)
    return model, cfg


@pytest.mark.parametrize("backend", ["sdpa", "local"])
@pytest.mark.parametrize("case", list(CASES))
def test_megatron_logits_match_transformers(hf_dirs: dict[str, Path], case: str, backend: str) -> None:
    from transformers import AutoModelForCausalLM

    model, cfg = _megatron_from_hf(hf_dirs[case], backend)
    tokens = torch.randint(0, cfg.vocab_size, (3, SEQ), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(SEQ).expand(3, SEQ)
    with cpu_megatron(), torch.no_grad():
        logits = model(tokens, positions, attention_mask=None)
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(hf_dirs[case], dtype=torch.float32)(tokens).logits
    assert logits.shape == want.shape
    assert (logits - want).abs().max().item() < LOGIT_TOL


@pytest.mark.parametrize("case", list(CASES))
def test_hf_megatron_hf_round_trip_is_bit_exact(hf_dirs: dict[str, Path], case: str) -> None:
    model, cfg = _megatron_from_hf(hf_dirs[case])
    mapping = mapping_for(cfg)
    exported = dict(pair for name, p in model.named_parameters() for pair in mapping.to_hf(name, p.detach()))
    hf = _hf_state(hf_dirs[case])
    assert set(exported) == set(hf)
    for name, tensor in hf.items():
        assert torch.equal(exported[name], tensor), name


def test_qwen3_qk_norms_map_to_megatron_qk_layernorms(hf_dirs: dict[str, Path]) -> None:
    model, cfg = _megatron_from_hf(hf_dirs["qwen3"])
    params = dict(model.named_parameters())
    hf = _hf_state(hf_dirs["qwen3"])
    for i in range(cfg.num_hidden_layers):
        for mg, ours in (("q_layernorm", "q_norm"), ("k_layernorm", "k_norm")):
            got = params[f"decoder.layers.{i}.self_attention.{mg}.weight"]
            assert got.shape == (cfg.head_dim,) and torch.equal(got, hf[f"model.layers.{i}.self_attn.{ours}.weight"])


def test_llama3_rope_frequencies_are_hfs_not_megatrons_builtin(hf_dirs: dict[str, Path]) -> None:
    """megatron's built-in Llama-3 scaling assumes original_max_position_embeddings=8192; the tiny
    config says 32, so the builder must install HF's frequencies (and they must differ here)."""
    from transformers import AutoModelForCausalLM

    model, cfg = _megatron_from_hf(hf_dirs["llama"])
    hf_inv_freq = AutoModelForCausalLM.from_pretrained(hf_dirs["llama"]).model.rotary_emb.inv_freq
    assert torch.equal(model.rotary_pos_emb.inv_freq, hf_inv_freq)
    plain = 1.0 / cfg.rope_parameters["rope_theta"] ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
    builtin = model.rotary_pos_emb._apply_scaling(plain, factor=cfg.rope_parameters["factor"])
    assert not torch.allclose(builtin, hf_inv_freq)


def test_unsupported_architecture_lists_the_supported_ones() -> None:
    from transformers import MistralConfig

    cfg = MistralConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1)
    for build in (lambda: build_gpt_model(cfg, params_dtype=torch.float32), lambda: mapping_for(cfg)):
        with pytest.raises(ValueError, match=r"model_type='mistral'.*llama, qwen2, qwen3"):
            build()


@pytest.mark.parametrize(("family", "overrides", "message"), [
    ("llama", {"attention_bias": True}, "attention_bias=True"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_type='yarn'"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window=True"),
])
def test_features_the_builder_cannot_reproduce_are_refused(family: str, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_gpt_model(tiny_hf_config(family, **overrides), params_dtype=torch.float32)


@pytest.mark.parametrize(("tp", "overrides", "bad"), [
    (4, {}, "num_key_value_heads=2"),
    (3, {}, "num_attention_heads=4, num_key_value_heads=2, vocab_size=64"),
    (2, {"vocab_size": 63}, "vocab_size=63"),
])
def test_tensor_parallel_size_must_divide_heads_and_vocab(tp: int, overrides: dict, bad: str) -> None:
    with pytest.raises(ConfigError, match=f"must divide the model's {bad}") as info:
        build_gpt_model(tiny_hf_config("qwen2", **overrides), params_dtype=torch.float32, tp=tp)
    assert info.value.key == "parallel.tensor_parallel_size" and "use one of" in info.value.fix
