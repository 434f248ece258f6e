"""Qwen2 / Qwen2.5 / Qwen2.5-Math: QKV bias, SwiGLU, RMSNorm, tied or untied embeddings.

Megatron names are those of megatron-core's local layer spec (separate `input_layernorm` and
`pre_mlp_layernorm` modules).
"""

from megatron_speed.bridge.mapping import Rule

LAYER = "decoder.layers.{i}"
HF_LAYER = "model.layers.{i}"

RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    Rule(f"{LAYER}.input_layernorm.weight", (f"{HF_LAYER}.input_layernorm.weight",)),
    Rule(f"{LAYER}.self_attention.linear_qkv.weight",
         tuple(f"{HF_LAYER}.self_attn.{p}_proj.weight" for p in "qkv"), "qkv"),
    Rule(f"{LAYER}.self_attention.linear_qkv.bias",
         tuple(f"{HF_LAYER}.self_attn.{p}_proj.bias" for p in "qkv"), "qkv"),
    Rule(f"{LAYER}.self_attention.linear_proj.weight", (f"{HF_LAYER}.self_attn.o_proj.weight",)),
    Rule(f"{LAYER}.pre_mlp_layernorm.weight", (f"{HF_LAYER}.post_attention_layernorm.weight",)),
    Rule(f"{LAYER}.mlp.linear_fc1.weight",
         (f"{HF_LAYER}.mlp.gate_proj.weight", f"{HF_LAYER}.mlp.up_proj.weight"), "gate_up"),
    Rule(f"{LAYER}.mlp.linear_fc2.weight", (f"{HF_LAYER}.mlp.down_proj.weight",)),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",)),
)
