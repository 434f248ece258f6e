"""Qwen3-MoE: the Qwen3 decoder (q/k norms, no QKV bias) whose MLP is a router plus experts in the
layers `moe_layer_pattern` marks sparse (the others keep Qwen3's dense MLP and its rules).

`{e}` is the GLOBAL expert index on both sides. HF stores each expert as its own gate/up/down
projections (`mlp.experts.{e}.gate_proj.weight`, which is also what vLLM's loader takes; transformers
fuses them into 3-D tensors only in memory). Megatron keeps this rank's experts under local indices;
`bridge/weights.py` turns local into global indices (expert-parallel rank x experts per rank + local)
before the rules see a name. Two megatron expert modules are covered: `SequentialMLP`
(`experts.local_experts.{e}.linear_fc1.weight`, the CPU path) and TransformerEngine's `TEGroupedMLP`
(`experts.linear_fc1.weight{e}`, grouped GEMM). The router is `mlp.router.weight` <-> `mlp.gate.weight`
([num_experts, hidden], replicated). With the TE spec the MoE layer's pre-MLP norm is a standalone
`pre_mlp_layernorm` (not fused into fc1), which the shared rules already map.
"""

from __future__ import annotations

from megatron_speed.bridge.llama import HF_LAYER, LAYER
from megatron_speed.bridge.mapping import Rule
from megatron_speed.bridge.qwen3 import RULES as QWEN3_RULES

HF_EXPERT = f"{HF_LAYER}.mlp.experts.{{e}}"
SEQUENTIAL = f"{LAYER}.mlp.experts.local_experts.{{e}}"
TE_GROUPED = f"{LAYER}.mlp.experts"

ROUTER_RULES: tuple[Rule, ...] = (
    Rule(f"{LAYER}.mlp.router.weight", (f"{HF_LAYER}.mlp.gate.weight",)),
)

EXPERT_RULES: tuple[Rule, ...] = (
    Rule(f"{SEQUENTIAL}.linear_fc1.weight", (f"{HF_EXPERT}.gate_proj.weight", f"{HF_EXPERT}.up_proj.weight"),
         "gate_up"),
    Rule(f"{SEQUENTIAL}.linear_fc2.weight", (f"{HF_EXPERT}.down_proj.weight",)),
    Rule(f"{TE_GROUPED}.linear_fc1.weight{{e}}", (f"{HF_EXPERT}.gate_proj.weight", f"{HF_EXPERT}.up_proj.weight"),
         "gate_up"),
    Rule(f"{TE_GROUPED}.linear_fc2.weight{{e}}", (f"{HF_EXPERT}.down_proj.weight",)),
)

RULES: tuple[Rule, ...] = QWEN3_RULES + ROUTER_RULES + EXPERT_RULES

MOE_FAMILIES = ("qwen3_moe",)
# MoE model_types we know and do not map, with what they have that Qwen3-MoE does not.
UNSUPPORTED_MOE = {
    "qwen2_moe": "shared experts (shared_expert + shared_expert_gate)",
    "deepseek_v2": "DeepSeek routing (grouped top-k, routed scaling), shared experts and MLA attention",
    "deepseek_v3": "DeepSeek routing (sigmoid scores, expert bias, grouped top-k), shared experts and MLA",
    "mixtral": "Mixtral's router and expert names (w1/w2/w3), sliding-window attention",
    "qwen3_next": "hybrid linear attention and shared experts",
    "olmoe": "OLMoE's router and q/k norms over the whole projection",
    "gpt_oss": "biased experts with clamped SwiGLU and attention sinks",
}


def refuse_unsupported_moe(model_type: str | None) -> None:
    """A clear error for the MoE variants we know and do not map (None for anything else)."""
    if model_type in UNSUPPORTED_MOE:
        raise ValueError(f"MoE model_type={model_type!r} is not supported: its {UNSUPPORTED_MOE[model_type]} "
                         f"are not mapped. Supported MoE families: {', '.join(MOE_FAMILIES)} "
                         "(Qwen3MoeForCausalLM: softmax top-k router, optional norm_topk_prob, no shared experts)")
