"""The model's sections of the config tree: which policy to train (`ModelConfig`, with its toy
warm start and LoRA adapters) and how the actor lays it out over ranks (`ParallelConfig`).

`schema.Config` assembles them with the other sections; they are re-exported there.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from megatron_speed.config.base import Section, require


@dataclasses.dataclass(frozen=True, kw_only=True)
class WarmupConfig(Section):
    """Supervised warm start of the toy model on worked answers (skipped when cached on disk).

    The length is a step count, not a time budget, so the warm start does not depend on the
    machine's speed. The default (about 40 s on 2 CPU cores) leaves greedy held-out accuracy near
    0.63 with per-prompt pass rates spread over 0..1, so RL has room to improve; the accuracy curve
    is steep (+0.2 per ~25 steps here), so recalibrate `steps` when changing lr, seed or model."""

    steps: int = 300
    lr: float = 2e-3
    batch_size: int = 128
    seed: int = 0  # model init and batch order

    def check(self) -> None:
        require(self.steps >= 0, "steps", self.steps, "must be >= 0",
                "give the warm-up a step count (0 = random init)")
        require(self.lr > 0, "lr", self.lr, "must be > 0", "use e.g. 2e-3")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1", "use e.g. 128")


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig(Section):
    """LoRA adapters on the actor's attention and MLP projections (`rank` 0 = full fine-tuning).

    `targets` are the HF projection names PEFT uses (`q_proj`, `k_proj`, `v_proj`, `o_proj`,
    `gate_proj`, `up_proj`, `down_proj`); each adapted projection gets `delta W = (alpha / rank) B A`,
    B zero-initialised (the adapted model starts as the base model). The base weights are frozen and
    never reach the optimizer. `refit` says what travels to vLLM after each step: "merged" weights
    (W + delta W, in buckets, as full fine-tuning) or the "adapter" tensors only (vLLM's LoRA path)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS
    seed: int = 0  # initialisation of the A matrices (identical at every TP layout)
    refit: Literal["merged", "adapter"] = "merged"

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    def check(self) -> None:
        require(self.rank >= 0, "rank", self.rank, "must be >= 0", "use 0 (off) or e.g. 8, 16, 64")
        require(self.alpha > 0, "alpha", self.alpha, "must be > 0", "use e.g. 2 x rank")
        require(0 <= self.dropout < 1, "dropout", self.dropout, "must be in [0, 1)", "use 0 (RL) or 0.05")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        require(not unknown, "targets", self.targets, f"holds unknown module name(s) {unknown}",
                f"use names from {', '.join(LORA_TARGETS)}")
        require(bool(self.targets) and len(set(self.targets)) == len(self.targets), "targets", self.targets,
                "must name at least one module, each once", f"use names from {', '.join(LORA_TARGETS)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig(Section):
    """The policy. `hf_path` is an HF folder (config, safetensors, tokenizer); "toy" builds the
    embedded tiny Qwen2 model and its tokenizer under run.output_dir's cache."""

    hf_path: str = "toy"
    params_dtype: Literal["float32", "bfloat16"] = "float32"
    toy_hidden_size: int = 128
    toy_layers: int = 3
    toy_heads: int = 4
    toy_kv_heads: int = 2  # < toy_heads: the toy exercises grouped-query attention in the bridge
    toy_ffn_hidden_size: int = 512
    toy_max_position_embeddings: int = 64
    # Core attention: "auto" = TransformerEngine when it imports, else "sdpa" (torch
    # scaled_dot_product_attention); "local" = megatron's unfused DotProductAttention; "te" insists on TE.
    attention_backend: Literal["auto", "sdpa", "local", "te"] = "auto"
    # Activation recomputation: "selective" recomputes core attention, "full" every transformer layer.
    recompute: Literal["none", "selective", "full"] = "none"
    # MoE models (actor/moe.py): the load-balancing loss coefficient (None = the HF config's
    # router_aux_loss_coef; 0 = off) and the expert capacity factor (0 = dropless; > 0 drops the
    # tokens beyond capacity x tokens x top-k / experts per expert, counted in moe/dropped_token_frac).
    moe_aux_loss_coef: float | None = None
    moe_capacity_factor: float = 0.0
    toy_family: Literal["qwen2", "qwen3_moe"] = "qwen2"  # the toy model: dense Qwen2, or Qwen3-MoE
    toy_experts: int = 4
    toy_experts_per_token: int = 2
    toy_expert_ffn_hidden_size: int = 128
    warmup: WarmupConfig = dataclasses.field(default_factory=WarmupConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)

    def check(self) -> None:
        require(self.toy_hidden_size % self.toy_heads == 0, "toy_hidden_size", self.toy_hidden_size,
                f"must be divisible by toy_heads ({self.toy_heads})", "change either so they divide")
        require(self.toy_hidden_size // self.toy_heads >= 32, "toy_hidden_size", self.toy_hidden_size,
                "gives a head dim below 32, which vLLM's CPU attention rejects",
                "use toy_hidden_size >= 32 * toy_heads")
        require(self.toy_kv_heads >= 1 and self.toy_heads % self.toy_kv_heads == 0, "toy_kv_heads",
                self.toy_kv_heads, f"must be >= 1 and divide toy_heads ({self.toy_heads})",
                "use e.g. toy_kv_heads=2 with toy_heads=4")
        require(self.moe_aux_loss_coef is None or self.moe_aux_loss_coef >= 0, "moe_aux_loss_coef",
                self.moe_aux_loss_coef, "must be >= 0 (or None for the HF config's)", "use e.g. 0.001, or 0 for off")
        require(self.moe_capacity_factor >= 0, "moe_capacity_factor", self.moe_capacity_factor, "must be >= 0",
                "use 0 for dropless routing, or e.g. 1.25")
        require(1 <= self.toy_experts_per_token <= self.toy_experts, "toy_experts_per_token",
                self.toy_experts_per_token, f"must be in 1..toy_experts ({self.toy_experts})",
                "route each token to at most as many experts as there are")
        require(not self.lora.enabled or self.attention_backend != "te", "lora.rank", self.lora.rank,
                "needs megatron's local linears: TransformerEngine fuses the input norms into linear_qkv and "
                "linear_fc1, so an adapter would see un-normalised inputs", "set model.attention_backend=sdpa")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelConfig(Section):
    """Actor layout: TP x PP (x virtual stages); the rest of the world is data parallelism.

    Pipeline stages hold equal layer counts unless `num_layers_in_first_pipeline_stage` and/or
    `num_layers_in_last_pipeline_stage` are set (megatron-core's uneven split): the stages in between
    share the remaining layers equally. E.g. 36 layers on 8 stages: first=3, last=3, six stages of 5.
    With virtual stages every stage's count divides by `virtual_pipeline_parallel_size`."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    virtual_pipeline_parallel_size: int = 1  # model chunks per pipeline stage (interleaved schedule); 1 = off
    # Context parallelism: each packed sequence is cut into 2 x CP chunks, chunk i and 2CP-1-i on CP
    # rank i (megatron's load-balanced split); needs optim.pack_sequences. Weights are not split by CP.
    context_parallel_size: int = 1
    num_layers_in_first_pipeline_stage: int | None = None  # None = the even split
    num_layers_in_last_pipeline_stage: int | None = None  # None = the even split

    # MoE models: experts split over `expert_parallel_size` ranks (taken from the data-parallel ranks);
    # each expert split over `expert_tensor_parallel_size` ranks (0 = the same as tensor_parallel_size).
    expert_parallel_size: int = 1
    expert_tensor_parallel_size: int = 0

    def check(self) -> None:
        require(self.context_parallel_size >= 1, "context_parallel_size", self.context_parallel_size,
                "must be >= 1", "use 1 for no context parallelism")
        require(self.tensor_parallel_size >= 1, "tensor_parallel_size", self.tensor_parallel_size,
                "must be >= 1", "use 1 for no tensor parallelism")
        require(self.pipeline_parallel_size >= 1, "pipeline_parallel_size", self.pipeline_parallel_size,
                "must be >= 1", "use 1 for no pipeline parallelism")
        require(self.virtual_pipeline_parallel_size >= 1, "virtual_pipeline_parallel_size",
                self.virtual_pipeline_parallel_size, "must be >= 1", "use 1 for no virtual pipeline stages")
        require(self.virtual_pipeline_parallel_size == 1 or self.pipeline_parallel_size > 1,
                "virtual_pipeline_parallel_size", self.virtual_pipeline_parallel_size,
                "needs pipeline parallelism (parallel.pipeline_parallel_size > 1)",
                "set parallel.pipeline_parallel_size >= 2 or parallel.virtual_pipeline_parallel_size=1")
        require(self.expert_parallel_size >= 1, "expert_parallel_size", self.expert_parallel_size, "must be >= 1",
                "use 1 for no expert parallelism")
        require(self.expert_tensor_parallel_size >= 0, "expert_tensor_parallel_size",
                self.expert_tensor_parallel_size, "must be >= 0", "use 0 (= tensor_parallel_size) or 1")
        for key in ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage"):
            value = getattr(self, key)
            if value is None:
                continue
            require(value >= 1, key, value, "must be >= 1 (or null for the even split)",
                    f"give the stage at least one layer, or set parallel.{key}=null")
            require(self.pipeline_parallel_size > 1, key, value,
                    "needs pipeline parallelism (parallel.pipeline_parallel_size > 1)",
                    f"set parallel.pipeline_parallel_size >= 2 or parallel.{key}=null")
            vpp = self.virtual_pipeline_parallel_size
            require(value % vpp == 0, key, value,
                    f"must be a multiple of virtual_pipeline_parallel_size ({vpp}): each virtual stage of a pipeline "
                    "stage holds the same number of layers", f"use a multiple of {vpp}")
        # megatron-core 0.16 divides by the number of middle stages when placing virtual stages.
        require(self.virtual_pipeline_parallel_size == 1 or self.pipeline_parallel_size > 2
                or None in (self.num_layers_in_first_pipeline_stage, self.num_layers_in_last_pipeline_stage),
                "num_layers_in_last_pipeline_stage", self.num_layers_in_last_pipeline_stage,
                "cannot be set together with num_layers_in_first_pipeline_stage when pipeline_parallel_size=2 has "
                "virtual stages (there is no middle stage)",
                "set parallel.num_layers_in_last_pipeline_stage=null: the last stage takes the remaining layers")

    @property
    def uneven(self) -> bool:
        return self.num_layers_in_first_pipeline_stage is not None or self.num_layers_in_last_pipeline_stage is not None

    @property
    def expert_tp(self) -> int:
        """The expert tensor-parallel size megatron gets (0 means: as the dense layers)."""
        return self.expert_tensor_parallel_size or self.tensor_parallel_size

    def layers_per_stage(self, num_layers: int) -> tuple[int, ...]:
        """Transformer layers on each pipeline stage for a model of `num_layers` layers (megatron-core's
        rule); ConfigError naming the dotted key when the sizes do not fit the model."""
        pp, vpp = self.pipeline_parallel_size, self.virtual_pipeline_parallel_size
        if not self.uneven:
            key, value = (("parallel.virtual_pipeline_parallel_size", vpp) if vpp > 1 else
                          ("parallel.pipeline_parallel_size", pp))
            require(num_layers % (pp * vpp) == 0, key, value,
                    f"pipeline_parallel_size ({pp}) x virtual_pipeline_parallel_size ({vpp}) must divide the "
                    f"model's {num_layers} layers", "choose sizes whose product divides the layers, or uneven "
                    "end stages (parallel.num_layers_in_first_pipeline_stage / _last_pipeline_stage)"
                    + (_uneven_hint(num_layers, pp) if vpp == 1 else ""))
            return (num_layers // pp,) * pp
        first, last = self.num_layers_in_first_pipeline_stage, self.num_layers_in_last_pipeline_stage
        middle = pp - (first is not None) - (last is not None)
        rest = num_layers - (first or 0) - (last or 0)
        key = "parallel.num_layers_in_first_pipeline_stage" if first is not None else \
            "parallel.num_layers_in_last_pipeline_stage"
        value = first if first is not None else last
        fits = rest == 0 if middle == 0 else rest >= middle * vpp and rest % (middle * vpp) == 0
        require(fits, key, value,
                f"leaves {rest} of the model's {num_layers} layers for {middle} other pipeline stage(s) "
                f"(first={first}, last={last}, pipeline_parallel_size={pp}, virtual_pipeline_parallel_size={vpp}), "
                "which must " + ("be 0" if middle == 0 else f"be a positive multiple of {middle * vpp}"),
                "pick end-stage sizes that fit" + (_uneven_hint(num_layers, pp) if vpp == 1 else ""))
        inner = rest // middle if middle else 0
        return (first if first is not None else inner, *(inner,) * (pp - 2),
                last if last is not None else inner)


def _uneven_hint(num_layers: int, pp: int) -> str:
    """`, e.g. parallel.num_layers_in_first_pipeline_stage=3 ...=3` for an uneven split that fits and keeps
    the end stages closest to the others (fewer layers on the ends on a tie); "" when there is none."""
    if pp < 2 or num_layers % pp == 0 or num_layers < pp:
        return ""
    if pp == 2:
        first = num_layers // 2
        last = num_layers - first
    else:
        inner = min(range(1, (num_layers - 2) // (pp - 2) + 1),
                    key=lambda k: (abs((num_layers - k * (pp - 2)) / 2 - k), num_layers - k * (pp - 2)))
        ends = num_layers - inner * (pp - 2)
        first, last = ends // 2, ends - ends // 2
    return (f", e.g. parallel.num_layers_in_first_pipeline_stage={first} "
            f"parallel.num_layers_in_last_pipeline_stage={last}")
