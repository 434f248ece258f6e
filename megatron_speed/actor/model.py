"""Build a megatron-core GPTModel from an HF config (qwen2 family; more families register here).

The local layer spec is used (TransformerEngine is optional and absent on CPU). Weights are loaded
separately through the bridge, so the model is built with random init and then overwritten.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}


def rope_theta(hf_config: Any) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(hf_config, "rope_theta", None) or 10000.0)


def transformer_config_from_hf(hf_config: Any, *, params_dtype: torch.dtype, tp: int = 1,
                               pp: int = 1) -> Any:
    """The megatron-core TransformerConfig equivalent to an HF decoder config."""
    from megatron.core.transformer import TransformerConfig

    heads = hf_config.num_attention_heads
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        num_attention_heads=heads,
        num_query_groups=getattr(hf_config, "num_key_value_heads", None) or heads,
        kv_channels=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        ffn_hidden_size=hf_config.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=ACTIVATIONS[hf_config.hidden_act],
        add_bias_linear=False,
        add_qkv_bias=hf_config.model_type == "qwen2",
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
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=not on_gpu,
        calculate_per_token_loss=True,  # the loss returns a token SUM; megatron divides by the global count
    )


def build_gpt_model(hf_config: Any, *, params_dtype: torch.dtype, tp: int = 1, pp: int = 1) -> Any:
    """A GPTModel for this rank's pipeline stage, matching the HF architecture."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    if hf_config.model_type not in ("qwen2",):
        raise ValueError(f"unsupported architecture model_type={hf_config.model_type!r} (supported: qwen2)")
    config = transformer_config_from_hf(hf_config, params_dtype=params_dtype, tp=tp, pp=pp)
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=hf_config.vocab_size,
        max_sequence_length=hf_config.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
        position_embedding_type="rope",
        rotary_base=int(rope_theta(hf_config)),
    )
