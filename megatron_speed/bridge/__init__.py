"""HF <-> Megatron bridge: one declarative mapping per architecture family.

`mapping_for(hf_config)` picks the family from the HF config's `model_type` and returns the
`FamilyMapping` the converters and the live refit both use.
"""

from __future__ import annotations

from typing import Any

from megatron_speed.bridge import llama, qwen2, qwen3, qwen3_moe
from megatron_speed.bridge.mapping import FamilyMapping, HeadLayout, Rule, merge_qkv, split_qkv
from megatron_speed.bridge.qwen3_moe import refuse_unsupported_moe

# model_type -> rules (qwen2 and qwen3 extend llama's, which include the TransformerEngine norm names).
FAMILIES: dict[str, tuple[Rule, ...]] = {
    "qwen2": qwen2.RULES,
    "llama": llama.RULES,
    "qwen3": qwen3.RULES,
    "qwen3_moe": qwen3_moe.RULES,
}


def mapping_for(hf_config: Any) -> FamilyMapping:
    model_type = getattr(hf_config, "model_type", None)
    refuse_unsupported_moe(model_type)
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported architecture model_type={model_type!r}; supported: "
                         f"{', '.join(sorted(FAMILIES))}")
    return FamilyMapping(FAMILIES[model_type], hf_config,
                         tied_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)))


__all__ = ["FAMILIES", "FamilyMapping", "HeadLayout", "Rule", "mapping_for", "merge_qkv", "split_qkv"]
