"""Build a megatron-core GPTModel from an HF config: qwen2, llama, qwen3 and qwen3_moe decoders.

What differs between the families is declared in `ARCHITECTURES` (QKV bias, per-head q/k RMSNorm);
everything else (RoPE, RMSNorm, SwiGLU, grouped-query attention, tied or untied embeddings) is
shared. Weights are loaded separately through the bridge, so the model is built with random init and
then overwritten.

Layer spec (`model.attention_backend`): TransformerEngine's spec when "te" (or "auto" and TE
imports); otherwise megatron's local spec, whose core attention is either our SDPA module ("sdpa",
`actor/attention.py`) or megatron's unfused `DotProductAttention` ("local").

RoPE: megatron's `RotaryEmbedding` computes plain inverse frequencies, and its Llama-3 scaling
hard-codes low_freq_factor=1, high_freq_factor=4 and original_max_position_embeddings=8192. HF
configs carry their own values, so for any scaled `rope_type` we take the inverse frequencies from
transformers' own `ROPE_INIT_FUNCTIONS` (the formula the HF model runs) and install them on the
rotary module, in `_install_hf_rope` and nowhere else. Types that also rescale attention (yarn,
longrope) or change with the sequence length (dynamic) are rejected.

MoE (qwen3_moe): the router, expert and layer-pattern facts come from `actor/moe.py`, which also
explains how HF's routing maps onto megatron's.

Deliberately left out: sliding-window attention, biases outside QKV (llama/qwen3 `attention_bias`,
`mlp_bias`), MoE families other than Qwen3-MoE, vocabularies that TP does not divide (megatron would
pad them; the bridge would not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from megatron_speed.actor import moe
from megatron_speed.config.base import ConfigError

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}
ATTENTION_BACKENDS = ("auto", "sdpa", "local", "te")
RECOMPUTE = {  # model.recompute -> megatron TransformerConfig fields
    "none": {},
    "selective": {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
}
STATIC_ROPE_TYPES = ("default", "linear", "llama3")  # inverse frequencies only, no attention rescale


@dataclass(frozen=True)
class Architecture:
    """What one HF `model_type` needs from megatron beyond the shared decoder."""

    qkv_bias: bool
    qk_layernorm: bool


ARCHITECTURES: dict[str, Architecture] = {
    "qwen2": Architecture(qkv_bias=True, qk_layernorm=False),
    "llama": Architecture(qkv_bias=False, qk_layernorm=False),
    "qwen3": Architecture(qkv_bias=False, qk_layernorm=True),
    "qwen3_moe": Architecture(qkv_bias=False, qk_layernorm=True),  # + experts: actor/moe.py
}


def architecture(hf_config: Any) -> Architecture:
    """The family facts of `hf_config`; ValueError for anything this builder cannot reproduce exactly."""
    model_type = getattr(hf_config, "model_type", None)
    moe.refuse_unsupported_moe(model_type)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture model_type={model_type!r}; supported: "
                         f"{', '.join(sorted(ARCHITECTURES))}")
    problems = moe.check_moe_config(hf_config) if moe.is_moe(hf_config) else []
    if hf_config.hidden_act not in ACTIVATIONS:
        problems.append(f"hidden_act={hf_config.hidden_act!r} (supported: {', '.join(ACTIVATIONS)})")
    for flag in ("use_sliding_window", "attention_bias", "mlp_bias"):
        if getattr(hf_config, flag, False):
            problems.append(f"{flag}=True")
    if rope_type(hf_config) not in STATIC_ROPE_TYPES:
        problems.append(f"rope_type={rope_type(hf_config)!r} (supported: {', '.join(STATIC_ROPE_TYPES)})")
    if problems:
        raise ValueError(f"{model_type} config not supported: {'; '.join(problems)}")
    return ARCHITECTURES[model_type]


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    return dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})


def rope_type(hf_config: Any) -> str:
    params = rope_parameters(hf_config)
    return str(params.get("rope_type") or params.get("type") or "default")


def rope_theta(hf_config: Any) -> float:
    return float(rope_parameters(hf_config).get("rope_theta") or getattr(hf_config, "rope_theta", None)
                 or 10000.0)


def head_dim(hf_config: Any) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def check_tensor_parallel(hf_config: Any, tp: int) -> None:
    """Megatron splits heads, query groups and the vocabulary evenly across TP ranks."""
    sizes = {"num_attention_heads": hf_config.num_attention_heads,
             "num_key_value_heads": getattr(hf_config, "num_key_value_heads", None) or
             hf_config.num_attention_heads, "vocab_size": hf_config.vocab_size}
    bad = [f"{k}={v}" for k, v in sizes.items() if v % tp]
    if bad:
        divisors = [d for d in range(1, max(sizes.values()) + 1) if all(v % d == 0 for v in sizes.values())]
        raise ConfigError("parallel.tensor_parallel_size", tp, f"must divide the model's {', '.join(bad)}",
                          f"use one of {divisors}")


def transformer_engine_problem() -> str | None:
    """Why TransformerEngine cannot serve megatron's TE layer spec here, or None when it can.

    The probe megatron itself makes (`gpt_layer_specs.HAVE_TE`): `transformer_engine.pytorch` and
    megatron's TE extension must import, not just the top-level `transformer_engine` package, which
    imports fine when the CUDA libraries behind `transformer_engine.pytorch` are missing or mismatched.
    Any exception counts (a missing shared library raises OSError, not ImportError).
    """
    try:
        import transformer_engine.pytorch
        from megatron.core.extensions import transformer_engine  # noqa: F401
        from megatron.core.models.gpt import gpt_layer_specs
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    if not gpt_layer_specs.HAVE_TE:
        return "megatron-core's gpt_layer_specs found no usable transformer_engine (HAVE_TE is False)"
    return None


def resolve_attention_backend(backend: str) -> str:
    """"auto" -> "te" when TransformerEngine is usable (`transformer_engine_problem`), else "sdpa";
    "te" without a usable TE is an error."""
    if backend not in ATTENTION_BACKENDS:
        raise ConfigError("model.attention_backend", backend, f"must be one of {', '.join(ATTENTION_BACKENDS)}",
                          "use 'auto' (TE if installed, else SDPA)")
    if backend not in ("auto", "te"):
        return backend
    problem = transformer_engine_problem()
    if problem is None:
        return "te"
    if backend == "te":
        raise ConfigError("model.attention_backend", backend, f"needs transformer_engine ({problem})",
                          "install TransformerEngine built for this torch and CUDA, or use 'sdpa'")
    return "sdpa"


def layer_spec(backend: str, *, qk_layernorm: bool, config: Any = None, vp_stage: int | None = None) -> Any:
    """The transformer-layer ModuleSpec for a resolved backend ("te" | "sdpa" | "local"); for an MoE
    `config`, the block spec of this stage's dense and MoE layers."""
    from megatron.core.models.gpt import gpt_layer_specs

    if config is not None and config.num_moe_experts:
        from megatron_speed.actor.attention import SDPAttention

        return moe.decoder_block_spec(config, backend, SDPAttention if backend == "sdpa" else None, vp_stage)
    if backend == "te":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    if backend == "sdpa":
        from megatron_speed.actor.attention import SDPAttention

        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def transformer_config_from_hf(hf_config: Any, *, params_dtype: torch.dtype, tp: int = 1, pp: int = 1,
                               recompute: str = "none", vpp: int | None = None, first_stage_layers: int | None = None,
                               last_stage_layers: int | None = None, cp: int = 1,
                               moe_fields: dict[str, Any] | None = None) -> Any:
    """The megatron-core TransformerConfig equivalent to an HF decoder config (`vpp`: virtual stages;
    `first_stage_layers` / `last_stage_layers`: megatron's uneven pipeline split, None = even; `cp`:
    context-parallel size, which splits sequences, never weights; `moe_fields`:
    `moe.moe_transformer_fields(...)` for an MoE decoder)."""
    from megatron.core.transformer import TransformerConfig

    arch = architecture(hf_config)
    if recompute not in RECOMPUTE:
        raise ConfigError("model.recompute", recompute, f"must be one of {', '.join(RECOMPUTE)}",
                          "use 'none', 'selective' (core attention) or 'full' (whole layers)")
    heads = hf_config.num_attention_heads
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        num_attention_heads=heads,
        num_query_groups=getattr(hf_config, "num_key_value_heads", None) or heads,
        kv_channels=head_dim(hf_config),
        ffn_hidden_size=hf_config.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=ACTIVATIONS[hf_config.hidden_act],
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        num_layers_in_first_pipeline_stage=first_stage_layers,
        num_layers_in_last_pipeline_stage=last_stage_layers,
        context_parallel_size=cp,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=not on_gpu,
        calculate_per_token_loss=True,  # the loss returns a token SUM; megatron divides by the global count
        **RECOMPUTE[recompute],
        **(moe_fields or {}),
    )


def _install_hf_rope(model: Any, hf_config: Any) -> None:
    """Replace megatron's inverse frequencies by HF's for a scaled rope_type (see module docstring)."""
    kind = rope_type(hf_config)
    if kind == "default":
        return  # megatron's formula with rotary_base = rope_theta is HF's
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rotary = model.rotary_pos_emb
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[kind](hf_config, "cpu")
    if attention_scaling != 1.0 or inv_freq.shape != rotary.inv_freq.shape:
        raise ValueError(f"rope_type={kind!r} gives attention_scaling={attention_scaling} and {tuple(inv_freq.shape)} "
                         f"frequencies; megatron expects 1.0 and {tuple(rotary.inv_freq.shape)}")
    rotary.inv_freq = inv_freq.to(device=rotary.inv_freq.device, dtype=rotary.inv_freq.dtype)


def build_gpt_model(hf_config: Any, *, params_dtype: torch.dtype, tp: int = 1, pp: int = 1,
                    attention_backend: str = "auto", recompute: str = "none", vp_stage: int | None = None,
                    first_stage_layers: int | None = None, last_stage_layers: int | None = None,
                    moe_aux_loss_coef: float | None = None, moe_capacity_factor: float = 0.0) -> Any:
    """A GPTModel for this rank's pipeline stage (and virtual stage `vp_stage` when megatron's
    parallel_state was initialised with virtual pipeline stages), matching the HF architecture.
    `first_stage_layers` / `last_stage_layers` give the end stages their own layer counts (megatron's
    uneven split; the caller checks the sizes with `ParallelConfig.layers_per_stage`). Expert
    parallelism (MoE) is read from megatron's parallel_state like the virtual stages; the MoE knobs
    default to the HF config's (`moe_aux_loss_coef` None = `router_aux_loss_coef`)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    arch = architecture(hf_config)
    check_tensor_parallel(hf_config, tp)
    backend = resolve_attention_backend(attention_backend)
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    etp = parallel_state.get_expert_tensor_parallel_world_size()
    moe.check_expert_parallel(hf_config, ep=ep, etp=etp, tp=tp)
    cp = parallel_state.get_context_parallel_world_size()
    moe_fields = moe.moe_transformer_fields(hf_config, ep=ep, etp=etp, aux_loss_coef=moe_aux_loss_coef,
                                            capacity_factor=moe_capacity_factor, grouped_gemm=backend == "te", cp=cp)
    config = transformer_config_from_hf(hf_config, params_dtype=params_dtype, tp=tp, pp=pp, recompute=recompute,
                                        vpp=vpp, first_stage_layers=first_stage_layers,
                                        last_stage_layers=last_stage_layers, cp=cp, moe_fields=moe_fields)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(backend, qk_layernorm=arch.qk_layernorm, config=config,
                                          vp_stage=vp_stage),
        vocab_size=hf_config.vocab_size,
        max_sequence_length=hf_config.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
        position_embedding_type="rope",
        rotary_base=rope_theta(hf_config),
        vp_stage=vp_stage,
    )
    _install_hf_rope(model, hf_config)
    return model
