"""Tiny random HF models of each supported family, written to a folder like a downloaded checkpoint.

Tests across the suite (bridge, attention, tensor/pipeline-parallel actor, refit) need real HF
folders (config.json + model.safetensors, optionally a tokenizer) and nothing can be downloaded
here, so this module writes them. Shapes are chosen so every layout we test divides them:

* 4 query heads and 2 KV heads (grouped-query attention, TP = 1, 2 or 4 splits both),
* vocabulary 64 (divisible by 4, and a multiple of the toy tokenizer's padding),
* head_dim 32 (vLLM's CPU attention needs >= 32); qwen3 uses head_dim 64 != hidden / heads, as
  the real Qwen3 models do, so code that derives head_dim from hidden size fails loudly,
* qwen3_moe: Qwen3's attention with 4 experts of width 64, top-2 routing with renormalised weights
  (`norm_topk_prob`, as Qwen3-30B-A3B), and layer 1 dense (`mlp_only_layers`) so both MLP kinds and
  the layer pattern are exercised; a router aux-loss coefficient of 0.01,
* llama carries Llama-3 RoPE scaling with a small `original_max_position_embeddings` so the
  scaled, smoothed and untouched frequency bands all occur within a few dozen positions.

Biases and norm weights are randomised (HF initialises them to 0 and 1), so a wrong QKV,
gate/up or q/k-norm mapping cannot hide behind zeros and ones. Weights are float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

FAMILIES = ("qwen2", "llama", "qwen3", "qwen3_moe")

_COMMON: dict[str, Any] = dict(
    vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, hidden_act="silu",
    pad_token_id=0, eos_token_id=1, bos_token_id=None, initializer_range=0.05, dtype="float32",
)

LLAMA3_ROPE: dict[str, Any] = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                                   high_freq_factor=4.0, original_max_position_embeddings=32)

_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2": dict(use_sliding_window=False),
    "llama": dict(rope_parameters=LLAMA3_ROPE, attention_bias=False, mlp_bias=False),
    "qwen3": dict(head_dim=64, attention_bias=False, use_sliding_window=False),
    "qwen3_moe": dict(head_dim=64, attention_bias=False, use_sliding_window=False, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True, decoder_sparse_step=1,
                      mlp_only_layers=[1], router_aux_loss_coef=0.01),
}


def tiny_hf_config(family: str, *, tie: bool = False, **overrides: Any) -> Any:
    """The HF config of a tiny model of `family`; `overrides` replace any config field."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    classes = {"qwen2": Qwen2Config, "llama": LlamaConfig, "qwen3": Qwen3Config, "qwen3_moe": Qwen3MoeConfig}
    if family not in classes:
        raise ValueError(f"unknown family {family!r}; tiny models exist for {', '.join(FAMILIES)}")
    kwargs = {**_COMMON, **_FAMILY_DEFAULTS[family], "tie_word_embeddings": tie, **overrides}
    kwargs.setdefault("architectures", [classes[family].__name__.replace("Config", "ForCausalLM")])
    return classes[family](**kwargs)


def _randomise_non_matrix_weights(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)


def tiny_hf_model(family: str, path: str | Path, *, tie: bool = False, seed: int = 0, tokenizer: bool = True,
                  **overrides: Any) -> Path:
    """Write a tiny random float32 HF model of `family` ("qwen2" | "llama" | "qwen3" | "qwen3_moe") to `path`.

    `tie` ties the input embedding and the LM head; `overrides` are HF config fields (e.g.
    `num_hidden_layers=4`, `vocab_size=128`). With `tokenizer` the toy task's tokenizer (ids < 20)
    is saved too, so `AutoTokenizer` and vLLM can load the folder. Returns `path`.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_hf_config(family, tie=tie, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    _randomise_non_matrix_weights(model, torch.Generator().manual_seed(seed + 1))
    model.save_pretrained(path)
    if tokenizer:
        from megatron_speed.toy.tokenizer import build_toy_tokenizer

        build_toy_tokenizer(path)
    return path
