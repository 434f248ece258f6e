"""The toy policy: a tiny Qwen2-architecture decoder that vLLM, the bridge and Megatron all accept
(or, with `model.toy_family="qwen3_moe"`, a tiny Qwen3-MoE of the same width; see `toy_qwen3_moe_config`).

Same family as the real models (RoPE, RMSNorm, SwiGLU, QKV bias, grouped-query attention when
`toy_kv_heads < toy_heads`), only small: 128 wide, 3 layers, heads of 32 (vLLM's CPU attention
needs head_dim >= 32), tied embeddings, float32.

Weights are drawn with std `hidden_size ** -0.5` (0.088 at width 128) instead of HF's default 0.02:
with 0.02 the attention logits start near zero and the warm-up sat on a plateau for ~1000 steps;
fan-in scaling reached the same accuracy in ~300 (measured on the toy task).

The vocabulary is padded up to a multiple of 32, as Megatron pads its own, so both sides agree on
the embedding shape; the padded rows are never a target and the warm-up drives their probability
to ~0.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase, Qwen2Config, Qwen3MoeConfig

from megatron_speed.config.schema import ModelConfig

VOCAB_MULTIPLE = 32


def padded_vocab_size(num_tokens: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Smallest multiple of `multiple` that holds `num_tokens` ids."""
    return -(-num_tokens // multiple) * multiple


def toy_qwen2_config(model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> Qwen2Config:
    """The HF config of the toy model, sized by the `toy_*` fields and the tokenizer's vocabulary."""
    return Qwen2Config(
        architectures=["Qwen2ForCausalLM"],
        vocab_size=padded_vocab_size(len(tokenizer)),
        hidden_size=model_cfg.toy_hidden_size,
        intermediate_size=model_cfg.toy_ffn_hidden_size,
        num_hidden_layers=model_cfg.toy_layers,
        num_attention_heads=model_cfg.toy_heads,
        num_key_value_heads=model_cfg.toy_kv_heads,
        hidden_act="silu",
        max_position_embeddings=model_cfg.toy_max_position_embeddings,
        rms_norm_eps=1e-6,
        initializer_range=model_cfg.toy_hidden_size ** -0.5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        use_sliding_window=False,
        max_window_layers=model_cfg.toy_layers,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        dtype="float32",
    )


def toy_qwen3_moe_config(model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> Qwen3MoeConfig:
    """The MoE toy: the dense toy's width, depth, heads and vocabulary, with per-head q/k norms and
    every layer's MLP replaced by `toy_experts` experts of width `toy_expert_ffn_hidden_size`, of
    which `toy_experts_per_token` run per token with renormalised weights (Qwen3-30B-A3B's router)."""
    dense = toy_qwen2_config(model_cfg, tokenizer)
    return Qwen3MoeConfig(
        architectures=["Qwen3MoeForCausalLM"],
        vocab_size=dense.vocab_size,
        hidden_size=dense.hidden_size,
        intermediate_size=dense.intermediate_size,  # unused: every layer is sparse
        moe_intermediate_size=model_cfg.toy_expert_ffn_hidden_size,
        num_experts=model_cfg.toy_experts,
        num_experts_per_tok=model_cfg.toy_experts_per_token,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        router_aux_loss_coef=0.001,
        num_hidden_layers=dense.num_hidden_layers,
        num_attention_heads=dense.num_attention_heads,
        num_key_value_heads=dense.num_key_value_heads,
        head_dim=dense.hidden_size // dense.num_attention_heads,
        hidden_act="silu",
        max_position_embeddings=dense.max_position_embeddings,
        rms_norm_eps=1e-6,
        initializer_range=dense.initializer_range,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        attention_bias=False,
        use_sliding_window=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        dtype="float32",
    )


def toy_config(model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> Any:
    """The toy model's HF config for `model.toy_family`."""
    if model_cfg.toy_family == "qwen3_moe":
        return toy_qwen3_moe_config(model_cfg, tokenizer)
    return toy_qwen2_config(model_cfg, tokenizer)


def build_toy_model(config: Any, seed: int) -> Any:
    """A randomly initialised float32 model; the same `seed` gives the same weights."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    return model
