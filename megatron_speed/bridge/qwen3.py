"""Qwen3 (dense): the Llama decoder plus a per-head RMSNorm on queries and keys, no QKV bias.

The q/k norms act on each head's `head_dim` vector after the projection and before RoPE; in
megatron-core that is `SelfAttention`'s `q_layernorm` / `k_layernorm` (built with
`qk_layernorm=True`), one weight of size head_dim shared by all heads, as in HF. head_dim may differ
from hidden_size / num_attention_heads (the HeadLayout reads it from the config).
"""

from megatron_speed.bridge.llama import HF_LAYER, LAYER
from megatron_speed.bridge.llama import RULES as LLAMA_RULES
from megatron_speed.bridge.mapping import Rule

QK_NORM_RULES: tuple[Rule, ...] = (
    Rule(f"{LAYER}.self_attention.q_layernorm.weight", (f"{HF_LAYER}.self_attn.q_norm.weight",)),
    Rule(f"{LAYER}.self_attention.k_layernorm.weight", (f"{HF_LAYER}.self_attn.k_norm.weight",)),
)

RULES: tuple[Rule, ...] = LLAMA_RULES + QK_NORM_RULES
