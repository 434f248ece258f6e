"""Qwen2 / Qwen2.5 / Qwen2.5-Math: the Llama decoder plus a bias on the fused QKV projection;
tied or untied embeddings (the tied output layer is dropped by `FamilyMapping`)."""

from megatron_speed.bridge.llama import HF_LAYER, LAYER
from megatron_speed.bridge.llama import RULES as LLAMA_RULES
from megatron_speed.bridge.mapping import Rule

QKV_BIAS_RULES: tuple[Rule, ...] = (
    Rule(f"{LAYER}.self_attention.linear_qkv.bias",
         tuple(f"{HF_LAYER}.self_attn.{p}_proj.bias" for p in "qkv"), "qkv"),
)

RULES: tuple[Rule, ...] = LLAMA_RULES + QKV_BIAS_RULES
