"""Mixture-of-experts decoders (Qwen3-MoE) as megatron-core MoE layers, read from the HF config.

What the HF config says and what megatron calls it:

* `num_experts` experts of width `moe_intermediate_size`, `num_experts_per_tok` chosen per token
  -> `num_moe_experts`, `moe_ffn_hidden_size`, `moe_router_topk`;
* the router: HF takes softmax over ALL experts, then the top k, then (with `norm_topk_prob`)
  renormalises the k weights to sum to one. Renormalised softmax-then-top-k equals top-k on the
  logits followed by a softmax over the k (megatron's default, `moe_router_pre_softmax=False`);
  without renormalisation the weights are the full-softmax values (`moe_router_pre_softmax=True`);
* which layers are MoE: HF layer i is sparse iff i is not in `mlp_only_layers` and
  (i + 1) % `decoder_sparse_step` == 0 -> megatron's per-layer `moe_layer_freq` list; dense layers
  keep `intermediate_size`;
* the load-balancing loss: `router_aux_loss_coef` -> megatron's "aux_loss" with `moe_aux_loss_coeff`
  (0 turns it off). megatron adds it per MoE layer (HF's training loss averages one loss over the
  layers' concatenated router logits); with our per-token loss megatron scales it by the tokens of
  each micro-batch, so its weight relative to the policy loss is coef x (all tokens / response
  tokens). `model.moe_aux_loss_coef` overrides the HF value. "All tokens" includes padding (the
  padded layout's right padding, context parallelism's padding of each packed sequence to 2 x CP):
  the router is given no padding mask, so padding counts in the aux loss and the router metrics.
  Under context parallelism megatron's coefficient is CP x ours (`moe_transformer_fields`).

Experts run as megatron's grouped GEMM (`TEGroupedMLP`) when TransformerEngine is the layer backend,
else as `SequentialMLP` (a loop of per-expert MLPs; what runs on CPU). The legacy `GroupedMLP` of the
`grouped_gemm` package is not used: its fused [hidden, experts x ffn] weights need a layout of their
own in the bridge and megatron deprecates it. Tokens move with the all-to-all dispatcher (which also
serves expert parallelism; gloo runs it on CPU).

Refused with the supported list: MoE families other than Qwen3-MoE (Qwen2-MoE's shared experts,
DeepSeek's grouped/sigmoid routing with expert bias, Mixtral, ...). Refused with the reason: TRAINING
an MoE model with tensor parallelism (megatron's MoE layer raises unless sequence parallelism is on,
and sequence parallelism needs TE/apex norms, which this actor does not use); experts are split with
`parallel.expert_parallel_size` and `parallel.expert_tensor_parallel_size` instead, which work with
TP=1. The converters, which do not train, build MoE models at any TP.
"""

from __future__ import annotations

from typing import Any

from megatron_speed.bridge.qwen3_moe import MOE_FAMILIES, UNSUPPORTED_MOE, refuse_unsupported_moe
from megatron_speed.config.base import ConfigError

__all__ = ["MOE_FAMILIES", "UNSUPPORTED_MOE", "is_moe", "moe_layer_pattern", "refuse_unsupported_moe"]


def is_moe(hf_config: Any) -> bool:
    return getattr(hf_config, "model_type", None) in MOE_FAMILIES


def num_experts(hf_config: Any) -> int:
    return int(getattr(hf_config, "num_experts", None) or getattr(hf_config, "num_local_experts", 0) or 0)


def moe_layer_pattern(hf_config: Any) -> list[int]:
    """1 for each HF layer that is sparse (an MoE block), 0 for a dense MLP, as transformers decides."""
    only_dense = set(getattr(hf_config, "mlp_only_layers", None) or ())
    step = int(getattr(hf_config, "decoder_sparse_step", 1) or 1)
    experts = num_experts(hf_config)
    return [int(i not in only_dense and experts > 0 and (i + 1) % step == 0)
            for i in range(hf_config.num_hidden_layers)]


def check_moe_config(hf_config: Any) -> list[str]:
    """What in a qwen3_moe config megatron cannot reproduce (empty when all is well)."""
    problems = []
    experts, topk = num_experts(hf_config), int(hf_config.num_experts_per_tok)
    if not 1 <= topk <= experts:
        problems.append(f"num_experts_per_tok={topk} with num_experts={experts}")
    if getattr(hf_config, "shared_expert_intermediate_size", 0):
        problems.append("shared_expert_intermediate_size (shared experts)")
    return problems


def check_expert_parallel(hf_config: Any, *, ep: int, etp: int, tp: int) -> None:
    """Experts split evenly over EP ranks; expert TP splits each expert's width; no EP x TP on CPU."""
    if ep > 1 and not is_moe(hf_config):
        raise ConfigError("parallel.expert_parallel_size", ep, f"needs an MoE model, but model_type is "
                          f"{getattr(hf_config, 'model_type', None)!r}", "use 1 for dense models")
    if not is_moe(hf_config):
        return
    experts = num_experts(hf_config)
    if experts % ep:
        divisors = [d for d in range(1, experts + 1) if experts % d == 0]
        raise ConfigError("parallel.expert_parallel_size", ep, f"must divide the model's num_experts={experts}",
                          f"use one of {divisors}")
    if hf_config.moe_intermediate_size % etp:
        raise ConfigError("parallel.expert_tensor_parallel_size", etp,
                          f"must divide the model's moe_intermediate_size={hf_config.moe_intermediate_size}",
                          "use 1 (whole experts per rank) or a divisor of it")
    if ep > 1 and tp > 1:
        raise ConfigError("parallel.expert_parallel_size", ep, f"with tensor_parallel_size={tp} needs "
                          "megatron's sequence parallelism, which this actor does not enable",
                          "use expert parallelism with tensor_parallel_size=1")


def check_trainable_layout(hf_config: Any, tp: int) -> None:
    """megatron's MoE layer refuses to train under TP > 1 without sequence parallelism (see above)."""
    if is_moe(hf_config) and tp > 1:
        raise ConfigError("parallel.tensor_parallel_size", tp, "must be 1 to train an MoE model: megatron's MoE "
                          "layer trains under tensor parallelism only with sequence parallelism, which needs "
                          "TE/apex norms and is not enabled here", "use tensor_parallel_size=1 and split the experts "
                          "with parallel.expert_parallel_size (and expert_tensor_parallel_size)")


def moe_transformer_fields(hf_config: Any, *, ep: int = 1, etp: int | None = None,
                           aux_loss_coef: float | None = None, capacity_factor: float = 0.0,
                           grouped_gemm: bool = False, cp: int = 1) -> dict[str, Any]:
    """The TransformerConfig fields of an MoE decoder ({} for a dense one).

    Under context parallelism megatron's coefficient is `cp` x ours: with `calculate_per_token_loss`
    its router multiplies each rank's share of the aux loss by that rank's token count, 1/CP of the
    micro-batch, so the CP ranks' gradients would add up to 1/CP of the aux-loss gradient at CP = 1
    (its other loss mode scales by the CP size for the same reason). The logged aux loss is divided
    by the coefficient and does not change; tests/distributed/test_moe_ep.py checks CP = 2 == CP = 1."""
    if not is_moe(hf_config):
        return {}
    coef = float(hf_config.router_aux_loss_coef if aux_loss_coef is None else aux_loss_coef)
    return dict(
        num_moe_experts=num_experts(hf_config),
        moe_ffn_hidden_size=hf_config.moe_intermediate_size,
        moe_router_topk=int(hf_config.num_experts_per_tok),
        moe_router_pre_softmax=not bool(getattr(hf_config, "norm_topk_prob", False)),
        moe_router_score_function="softmax",
        moe_router_dtype="fp32",
        moe_layer_freq=moe_layer_pattern(hf_config),
        moe_router_load_balancing_type="aux_loss" if coef > 0 else "none",
        moe_aux_loss_coeff=coef * cp,
        moe_expert_capacity_factor=capacity_factor or None,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=grouped_gemm,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )


def reset_aux_loss_scale() -> None:
    """Forget the aux-loss gradient scale megatron keeps on a class attribute. Its schedule sets it (a
    [1] tensor) at every forward step and copies into it after the first; a backward through an aux loss
    outside the schedule creates it as a 0-d tensor instead, after which every schedule in the process
    fails on the copy ("output with shape [] doesn't match the broadcast shape [1]")."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None


def _define_missing_te_gemm() -> None:
    """megatron-core 0.16.1's router GEMM tests `te_general_gemm is not None`, a name its module binds
    only when TransformerEngine imports: without TE every MoE forward raised NameError. Binding it to
    None selects the plain torch.mm path the code already has (GPU or CPU)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def decoder_block_spec(config: Any, backend: str, core_attention: type | None, vp_stage: int | None) -> Any:
    """Megatron's per-layer specs (dense or MoE, per `moe_layer_freq`) for this pipeline stage, with
    our core attention swapped in when the backend is not TE."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    _define_missing_te_gemm()
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=backend == "te", normalization="RMSNorm",
                                       vp_stage=vp_stage)
    if core_attention is not None:
        for spec in block.layer_specs:
            spec.submodules.self_attention.submodules.core_attention = core_attention
    return block
