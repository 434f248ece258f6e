"""Per-GPU memory of a colocated run, by phase: what the actor, the optimizer and the engine hold.

Estimates from arithmetic, checked where the libraries can be asked on CPU (tests/unit/test_memory_plan.py):
parameter counts and weight / gradient-buffer / optimizer-state bytes against a megatron-core model,
DDP buffer and optimizer built on CPU, and megatron's own per-parameter rule (18 bytes, or 6 + 12/DP
with the distributed optimizer: Megatron-LM `theoretical_memory_usage.py`); KV-cache bytes per token
against vLLM's own `KVCacheSpec` and the block count a CPU engine allocates. Activations and logits are
estimates (element counts of megatron's local layers with SDPA, below) to be checked against real
peaks on a GPU host (`tools/gpu_check.sh`).

Phases (colocated placement, level-2 sleep):
- **train** (engine asleep: weights discarded, KV freed): actor weights, fp32 gradient buffer,
  optimizer state (fp32 main params + Adam moments, sharded over DP with the distributed
  optimizer), reference model (KL), activations of one micro-batch in flight per pipeline stage
  ahead, and the fp32 logits of the loss;
- **generate** (engine awake): the actor's persistent state + engine weights + KV cache + the engine's
  workspace (its profiled forward, sampler logits, CUDA graphs).
Both add RUNTIME_RESERVE (CUDA context, NCCL and cuBLAS workspaces, allocator fragmentation).

Deliberately left out: sequence parallelism (needs TE/apex; the local spec replicates norms and
residuals over TP), MoE, and the transient all-gather buffers of the distributed optimizer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

GIB = 2**30
RUNTIME_RESERVE = int(2.0 * GIB)  # CUDA context (~0.5 GiB), NCCL/cuBLAS workspaces, fragmentation: an estimate


@dataclass(frozen=True)
class ModelShape:
    """The decoder dimensions that memory depends on (qwen2 / llama / qwen3 families)."""

    name: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    qk_norm: bool = False

    @classmethod
    def from_hf(cls, hf_config: Any, name: str = "") -> ModelShape:
        heads = hf_config.num_attention_heads
        return cls(name=name or getattr(hf_config, "_name_or_path", "") or hf_config.model_type,
                   layers=hf_config.num_hidden_layers, hidden=hf_config.hidden_size, ffn=hf_config.intermediate_size,
                   heads=heads, kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
                   vocab=hf_config.vocab_size, tied=bool(hf_config.tie_word_embeddings),
                   qkv_bias=hf_config.model_type == "qwen2", qk_norm=hf_config.model_type == "qwen3")

    def layer_params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = self.hidden * (q + 2 * kv) + q * self.hidden + (q + 2 * kv if self.qkv_bias else 0)
        norms = 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        return attention + 3 * self.hidden * self.ffn + norms

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def total_params(self) -> int:
        heads = 1 if self.tied else 2
        return heads * self.embedding_params() + self.layers * self.layer_params() + self.hidden

    def stage_params(self, tp: int, pp: int) -> int:
        """Parameters on the fullest rank of a TP x PP layout: linear layers and the vocabulary are split
        over TP (norms and biases of row-parallel layers replicated, counted whole); the first stage holds
        the embedding, the last the output layer (a copy of the embedding when tied and PP > 1)."""
        layers = -(-self.layers // pp) * self.layer_params() // tp
        first = self.embedding_params() // tp
        last = self.hidden + (self.embedding_params() // tp if (not self.tied or pp > 1) else 0)
        if pp == 1:
            return layers + first + last
        return layers + max(first, last)

    def kv_bytes_per_token(self, tp: int, dtype_bytes: int = 2) -> int:
        """K and V of every layer for one token on one engine rank (KV heads split over TP, replicated
        when TP exceeds them)."""
        return 2 * self.layers * max(1, self.kv_heads // tp) * self.head_dim * dtype_bytes


# The papers' models as published on the hub (config.json), for planning without a local copy.
KNOWN_SHAPES = {
    "Qwen2.5-Math-1.5B": ModelShape("Qwen2.5-Math-1.5B", layers=28, hidden=1536, ffn=8960, heads=12, kv_heads=2,
                                    head_dim=128, vocab=151936, tied=True, qkv_bias=True),
    "Qwen2.5-Math-7B": ModelShape("Qwen2.5-Math-7B", layers=28, hidden=3584, ffn=18944, heads=28, kv_heads=4,
                                  head_dim=128, vocab=152064, tied=False, qkv_bias=True),
    "Qwen3-4B-Base": ModelShape("Qwen3-4B-Base", layers=36, hidden=2560, ffn=9728, heads=32, kv_heads=8,
                                head_dim=128, vocab=151936, tied=True, qk_norm=True),
}


@dataclass(frozen=True)
class PlanInputs:
    """What the plan depends on, from a validated config plus the machine (`from_config`)."""

    gpus: int
    gpu_bytes: int
    tp: int
    pp: int
    params_bytes: int  # 2 (bf16) or 4 (fp32)
    distributed_optimizer: bool
    recompute: str  # none | selective | full
    micro_batch_tokens: int  # tokens of one micro-batch (rows x padded length)
    reference_model: bool  # KL penalty: a frozen copy of the policy
    entropy: bool  # entropy bonus: extra fp32 logits-sized tensors
    rollout_tp: int
    utilization: float
    kv_cache_bytes: int  # explicit (rollout.kv_cache_gib); 0 = sized from what is free
    max_model_len: int
    concurrent_sequences: int  # sequences of one generation call
    eager: bool
    refit_bucket_bytes: int

    @property
    def dp(self) -> int:
        return max(1, self.gpus // (self.tp * self.pp))

    @classmethod
    def from_config(cls, cfg: Any, *, gpus: int, gpu_gib: float, prompt_tokens: int) -> PlanInputs:
        max_len = prompt_tokens + cfg.rollout.max_new_tokens
        optim = cfg.optim
        tokens = max(optim.micro_batch_tokens, max_len) if optim.micro_batch_tokens else \
            optim.micro_batch_size * max_len
        cur, n = cfg.curriculum, cfg.rollout.n
        per_call = {"speed": cur.screen_prompts_per_call * cur.n_init + cur.prompts_per_step * cur.n_continue,
                    "dapo": cur.dapo_prompts_per_call * n}.get(cur.name, cur.prompts_per_step * n)
        return cls(gpus=gpus, gpu_bytes=int(gpu_gib * GIB), tp=cfg.parallel.tensor_parallel_size,
                   pp=cfg.parallel.pipeline_parallel_size,
                   params_bytes=2 if cfg.model.params_dtype == "bfloat16" else 4,
                   distributed_optimizer=optim.use_distributed_optimizer, recompute=cfg.model.recompute,
                   micro_batch_tokens=tokens, reference_model=cfg.algorithm.kl_coef > 0,
                   entropy=cfg.algorithm.entropy_coef > 0, rollout_tp=cfg.rollout.tensor_parallel_size,
                   utilization=cfg.rollout.gpu_memory_utilization, kv_cache_bytes=int(cfg.rollout.kv_cache_gib * GIB),
                   max_model_len=max_len, concurrent_sequences=per_call, eager=cfg.rollout.enforce_eager,
                   refit_bucket_bytes=int(cfg.rollout.refit_bucket_mb * 2**20))


def optimizer_bytes_per_param(params_bytes: int, distributed: bool, dp: int) -> tuple[float, float]:
    """(bytes allocated when the optimizer is built, bytes Adam allocates at its first step) per local
    parameter: fp32 main params (bf16 training only), then the two fp32 moments; /DP when distributed."""
    share = dp if distributed else 1
    return (4.0 if params_bytes == 2 else 0.0) / share, 8.0 / share


def activation_bytes(shape: ModelShape, inputs: PlanInputs) -> int:
    """Activations saved for backward on the fullest pipeline stage (1F1B keeps PP micro-batches in flight
    on the first stage: layers/PP x PP = all layers' worth), element counts of the local spec with SDPA:
    per token and layer 2 norm inputs and the residual (replicated over TP, no sequence parallelism),
    QKV input, Q/K/V, the attention output and its softmax statistics, the MLP input, gate/up outputs and
    the SwiGLU output (split over TP). `full` recompute keeps each layer's input plus one layer in full."""
    elem = inputs.params_bytes
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    replicated = 3 * shape.hidden
    split = (shape.hidden + q + 2 * kv + q + shape.hidden + 3 * shape.ffn + shape.heads * 2) / inputs.tp
    per_layer_token = (replicated + split) * elem
    tokens = inputs.micro_batch_tokens
    if inputs.recompute == "full":
        return int(tokens * (shape.layers * shape.hidden * elem + per_layer_token))
    return int(tokens * shape.layers * per_layer_token)


def logits_bytes(shape: ModelShape, inputs: PlanInputs) -> int:
    """The loss's vocabulary-sized tensors for one micro-batch (V/TP per rank): the model's logits in
    the params dtype, their fp32 copy (Float16Module), the contiguous shifted copy cross entropy works
    on, the fp32 gradient of the logits; the entropy bonus adds its centred logits and their exp."""
    per_element = inputs.params_bytes + 4 + 4 + 4 + (8 if inputs.entropy else 0)
    return int(inputs.micro_batch_tokens * shape.vocab / inputs.tp * per_element)


def engine_workspace_bytes(shape: ModelShape, *, rollout_tp: int, eager: bool) -> int:
    """The engine's peak besides weights and KV (an estimate of what vLLM's profiling run reserves):
    one 8192-token forward's widest activations, fp32 sampler logits for 256 sequences, CUDA graphs."""
    forward = 8192 * (4 * shape.hidden + 2 * shape.ffn // rollout_tp) * 2
    sampler = 256 * shape.vocab * 4 * 2
    graphs = 0 if eager else GIB // 2
    return forward + sampler + graphs


@dataclass(frozen=True)
class EngineMemory:
    """What the engine is given: its budget (as `gpu_memory_utilization` x total) and the KV cache inside it."""

    kv_cache_bytes: int
    utilization: float


def engine_memory(*, total: int, free: int, pending: int, engine_weights: int, workspace: int,
                  utilization: float, reserve: int = RUNTIME_RESERVE) -> EngineMemory:
    """Size the engine from what is free once the actor exists (the runtime rule, shared with the plan).

    `free` is measured after the actor (weights, gradient buffer, optimizer main params) is built;
    `pending` is what the actor allocates later and keeps (Adam moments at the first step). The
    engine may use at most `utilization` x total and at most what is left after `pending` and the
    reserve; vLLM's start-up check wants the utilization it is given to be free, so it is returned too.
    """
    budget = min(int(utilization * total), free - pending - reserve)
    kv = budget - engine_weights - workspace
    return EngineMemory(kv_cache_bytes=max(kv, 0), utilization=max(budget, 0) / total)


@dataclass(frozen=True)
class Plan:
    """Per-GPU bytes by item and phase for one layout."""

    inputs: PlanInputs
    items: dict[str, int]
    phases: dict[str, int]
    kv_tokens: int
    kv_bytes_per_token: int

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    def problems(self) -> list[str]:
        gpu = self.inputs.gpu_bytes
        out = [f"{phase} needs {v / GIB:.1f} GiB of {gpu / GIB:.0f} GiB" for phase, v in self.phases.items() if v > gpu]
        if self.kv_tokens < self.inputs.max_model_len:
            out.append(f"the KV cache holds {self.kv_tokens} tokens, fewer than one {self.inputs.max_model_len}-token "
                       "sequence (vLLM refuses to start)")
        return out

    @property
    def fits(self) -> bool:
        return not self.problems()


def plan(shape: ModelShape, inputs: PlanInputs) -> Plan:
    local = shape.stage_params(inputs.tp, inputs.pp)
    built, first_step = optimizer_bytes_per_param(inputs.params_bytes, inputs.distributed_optimizer, inputs.dp)
    items = {"actor weights": local * inputs.params_bytes, "gradient buffer (fp32)": local * 4,
             "optimizer: fp32 main params": int(local * built), "optimizer: Adam moments": int(local * first_step),
             "reference model (KL)": local * inputs.params_bytes if inputs.reference_model else 0,
             "activations (one micro-batch per stage ahead)": activation_bytes(shape, inputs),
             "logits and their gradient (fp32)": logits_bytes(shape, inputs),
             "engine weights (bf16)": shape.total_params() * 2 // inputs.rollout_tp,
             "engine workspace": engine_workspace_bytes(shape, rollout_tp=inputs.rollout_tp, eager=inputs.eager),
             "runtime reserve": RUNTIME_RESERVE}
    resident = sum(items[k] for k in ("actor weights", "gradient buffer (fp32)", "optimizer: fp32 main params",
                                      "optimizer: Adam moments", "reference model (KL)"))
    per_token = shape.kv_bytes_per_token(inputs.rollout_tp)
    if inputs.kv_cache_bytes:
        kv = inputs.kv_cache_bytes
    else:
        free = inputs.gpu_bytes - (resident - items["optimizer: Adam moments"])
        kv = engine_memory(total=inputs.gpu_bytes, free=free, pending=items["optimizer: Adam moments"],
                           engine_weights=items["engine weights (bf16)"], workspace=items["engine workspace"],
                           utilization=inputs.utilization).kv_cache_bytes
    items["KV cache"] = kv
    phases = {
        "train (engine asleep)": resident + items["activations (one micro-batch per stage ahead)"]
        + items["logits and their gradient (fp32)"] + RUNTIME_RESERVE,
        "refit (engine weights awake)": resident + items["engine weights (bf16)"] + 2 * inputs.refit_bucket_bytes
        + shape.embedding_params() * 2 + RUNTIME_RESERVE,
        "generate (engine awake)": resident + items["engine weights (bf16)"] + kv + items["engine workspace"]
        + RUNTIME_RESERVE,
    }
    return Plan(inputs=inputs, items=items, phases=phases, kv_tokens=kv // per_token, kv_bytes_per_token=per_token)


def _candidates(shape: ModelShape, inputs: PlanInputs) -> list[tuple[str, PlanInputs]]:
    """Single changes a user would try, cheapest first, as (dotted override, changed inputs)."""
    out: list[tuple[str, PlanInputs]] = []
    if inputs.recompute != "full":
        out.append(("model.recompute=full", dataclasses.replace(inputs, recompute="full")))
    if not inputs.distributed_optimizer and inputs.dp > 1:
        out.append(("optim.use_distributed_optimizer=true", dataclasses.replace(inputs, distributed_optimizer=True)))
    budget = inputs.micro_batch_tokens // 2
    while budget >= inputs.max_model_len:
        out.append((f"optim.micro_batch_tokens={budget}", dataclasses.replace(inputs, micro_batch_tokens=budget)))
        budget //= 2
    for tp in (2 * inputs.tp, 4 * inputs.tp):
        if inputs.gpus % (tp * inputs.pp) == 0 and all(v % tp == 0 for v in (shape.heads, shape.kv_heads, shape.vocab)):
            out.append((f"parallel.tensor_parallel_size={tp}", dataclasses.replace(inputs, tp=tp)))
    if inputs.kv_cache_bytes:
        out.append(("rollout.kv_cache_gib=0", dataclasses.replace(inputs, kv_cache_bytes=0)))
    return out


def suggest(shape: ModelShape, inputs: PlanInputs) -> list[str] | None:
    """The first override (or pair of overrides) from `_candidates` that makes the plan fit; [] when it
    already fits, None when nothing tried fits."""
    if plan(shape, inputs).fits:
        return []
    singles = _candidates(shape, inputs)
    for override, changed in singles:
        if plan(shape, changed).fits:
            return [override]
    for override, changed in singles:
        for second, twice in _candidates(shape, changed):
            if second.split("=")[0] != override.split("=")[0] and plan(shape, twice).fits:
                return [override, second]
    return None
