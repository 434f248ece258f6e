"""LoRA adapters between Megatron and HF/PEFT: which megatron linear each PEFT target lives in, and
the PEFT names of the adapter tensors (what `peft` and vLLM's LoRA loader read).

PEFT adapts HF's separate projections; megatron fuses q/k/v into `linear_qkv` and gate/up into
`linear_fc1`. An adapter on a fused linear therefore keeps one (A, B) pair per HF projection, and its
output is assembled into the fused layout (per query group for QKV, [gate; up] for the GLU), so the
adapter tensors ARE PEFT's tensors: a TP shard of B (column-parallel) or of A (row-parallel) is a
plain slice of PEFT's, and gathering is concatenation. Nothing is merged or re-factorised.

PEFT key: `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` ([rank, in]) and
`...lora_B.weight` ([out, rank]); `delta W = (alpha / rank) B A`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class AdapterTarget:
    """One PEFT target name and the megatron linear that holds its projection."""

    hf: str  # PEFT's target module name ("q_proj")
    hf_module: str  # its path under an HF decoder layer ("self_attn.q_proj")
    linear: str  # the megatron linear under a TransformerLayer ("self_attention.linear_qkv")
    parallel: Literal["column", "row"]  # column: B split on dim 0 like W; row: A split on dim 1 like W
    fused: Literal["copy", "qkv", "gate_up"]  # how the linear's output interleaves its projections


TARGETS: dict[str, AdapterTarget] = {t.hf: t for t in (
    AdapterTarget("q_proj", "self_attn.q_proj", "self_attention.linear_qkv", "column", "qkv"),
    AdapterTarget("k_proj", "self_attn.k_proj", "self_attention.linear_qkv", "column", "qkv"),
    AdapterTarget("v_proj", "self_attn.v_proj", "self_attention.linear_qkv", "column", "qkv"),
    AdapterTarget("o_proj", "self_attn.o_proj", "self_attention.linear_proj", "row", "copy"),
    AdapterTarget("gate_proj", "mlp.gate_proj", "mlp.linear_fc1", "column", "gate_up"),
    AdapterTarget("up_proj", "mlp.up_proj", "mlp.linear_fc1", "column", "gate_up"),
    AdapterTarget("down_proj", "mlp.down_proj", "mlp.linear_fc2", "row", "copy"),
)}

# Megatron name of an adapter tensor: "<linear>.lora.lora_A.<target>" under a (global) layer.
_ADAPTER = re.compile(r"^decoder\.layers\.(?P<i>\d+)\.(?P<linear>.+)\.lora\.lora_(?P<ab>[AB])\.(?P<target>\w+)$")


def adapter_param_name(linear: str, ab: str, target: str) -> str:
    """The parameter name of one adapter matrix relative to its TransformerLayer."""
    return f"{linear}.lora.lora_{ab}.{target}"


def peft_name(megatron_name: str) -> str:
    """`decoder.layers.3.self_attention.linear_qkv.lora.lora_A.q_proj` ->
    `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`."""
    m = _ADAPTER.match(megatron_name)
    if m is None or m["target"] not in TARGETS or TARGETS[m["target"]].linear != m["linear"]:
        raise KeyError(f"{megatron_name!r} is not a LoRA adapter tensor of a supported target")
    return f"{PEFT_PREFIX}model.layers.{m['i']}.{TARGETS[m['target']].hf_module}.lora_{m['ab']}.weight"


def linears(targets: tuple[str, ...]) -> dict[str, list[AdapterTarget]]:
    """The megatron linears to adapt, each with its targets in the fused output's order."""
    out: dict[str, list[AdapterTarget]] = {}
    for target in TARGETS.values():  # table order = fused order (q, k, v; gate, up)
        if target.hf in targets:
            out.setdefault(target.linear, []).append(target)
    return out


def peft_adapter_config(*, base_model: str, rank: int, alpha: float, dropout: float,
                        targets: tuple[str, ...]) -> dict[str, object]:
    """`adapter_config.json` for a plain LoRA adapter (what `PeftModel.from_pretrained` reads)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": sorted(targets),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
    }


@torch.no_grad()
def export_adapter_weights(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the LoRA adapters as PEFT-named FULL tensors, identically on every rank (collective, like
    `export_hf_weights`): TP shards gathered, pipeline stages broadcast."""
    from megatron_speed.bridge.weights import _global_params, bare_chunks, stream_full_tensors

    local = {name: (chunk, param) for chunk in bare_chunks(model)
             for name, param in _global_params(chunk, adapters=True)}
    if not local:
        raise ValueError("the model has no LoRA adapters (model.lora.rank is 0)")
    for name, full in stream_full_tensors(local):
        yield peft_name(name), full
