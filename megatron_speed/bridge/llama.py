"""Llama (2, 3, 3.x): the plain decoder the other families extend: no biases, SwiGLU, RMSNorm, GQA.

`DECODER_RULES` are the tensors every family here shares. Llama-3 RoPE scaling has no weights; the
model builder takes care of it (actor/model.py). Megatron names are those of megatron-core's local
layer spec; `TE_NORM_RULES` add the names the TransformerEngine spec gives the same two norms (fused
into the following linear layer as `layer_norm_weight`), so the mapping serves either spec.
"""

from megatron_speed.bridge.mapping import Rule

LAYER = "decoder.layers.{i}"
HF_LAYER = "model.layers.{i}"

DECODER_RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    Rule(f"{LAYER}.input_layernorm.weight", (f"{HF_LAYER}.input_layernorm.weight",)),
    Rule(f"{LAYER}.self_attention.linear_qkv.weight",
         tuple(f"{HF_LAYER}.self_attn.{p}_proj.weight" for p in "qkv"), "qkv"),
    Rule(f"{LAYER}.self_attention.linear_proj.weight", (f"{HF_LAYER}.self_attn.o_proj.weight",)),
    Rule(f"{LAYER}.pre_mlp_layernorm.weight", (f"{HF_LAYER}.post_attention_layernorm.weight",)),
    Rule(f"{LAYER}.mlp.linear_fc1.weight",
         (f"{HF_LAYER}.mlp.gate_proj.weight", f"{HF_LAYER}.mlp.up_proj.weight"), "gate_up"),
    Rule(f"{LAYER}.mlp.linear_fc2.weight", (f"{HF_LAYER}.mlp.down_proj.weight",)),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",)),
)

TE_NORM_RULES: tuple[Rule, ...] = (
    Rule(f"{LAYER}.self_attention.linear_qkv.layer_norm_weight", (f"{HF_LAYER}.input_layernorm.weight",)),
    Rule(f"{LAYER}.mlp.linear_fc1.layer_norm_weight", (f"{HF_LAYER}.post_attention_layernorm.weight",)),
)

RULES: tuple[Rule, ...] = DECODER_RULES + TE_NORM_RULES
