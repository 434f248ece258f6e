"""Move weights between HF-named full tensors and this rank's Megatron shards, for any TP/PP/VPP layout.

`load_hf_weights` gives each rank its shard of every full HF-built tensor; `export_hf_weights` streams
HF-named FULL tensors on every rank, one parameter at a time, so memory stays bounded by the largest
parameter. The family mapping (`bridge/mapping.py`) works on full tensors only; this module adds the
layout facts that megatron keeps on each parameter:

* `tensor_model_parallel` / `partition_dim`: the split dimension (column-parallel and vocab-parallel
  weights and biases split dim 0, row-parallel weights dim 1; norms are replicated);
* the GLU `linear_fc1` shard is [gate_shard; up_shard], not a dim-0 slice of cat(gate, up);
* the fused QKV of `merge_qkv` is laid out per query group, so a dim-0 split hands each rank whole
  groups, which is what megatron's attention expects (num_query_groups must divide by TP);
* a pipeline stage numbers its layers from 0: megatron's `get_transformer_layer_offset` maps them to
  global indices (per virtual chunk with VPP);
* with tied embeddings and PP > 1 the last stage holds `output_layer.weight`, a copy of the word
  embedding kept in sync by megatron's embedding group: it loads from the embedding and is never
  exported.

* MoE experts (family rules with `{e}`): a rank holds `num_experts / EP` whole experts under local
  indices, the expert-parallel rank's block of the global ones; each is split over the EXPERT
  tensor-parallel group (not the dense TP group). Names are turned into global expert indices
  before the family rules see them. Export gathers one local expert slot at a time over the
  expert-parallel group, so a rank holds at most EP copies of one expert tensor.

Deliberately left out: vocabularies that TP does not divide (megatron would pad them), megatron's
legacy `GroupedMLP` (fused [hidden, experts x ffn] weights; see actor/moe.py).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_speed.bridge.mapping import FamilyMapping

EMBEDDING = "embedding.word_embeddings.weight"
TIED_OUTPUT = "output_layer.weight"
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")

Chunks = torch.nn.Module | Sequence[torch.nn.Module]
ValueFn = Callable[[torch.nn.Parameter], torch.Tensor]  # a parameter -> this rank's tensor to export for it


def bare_chunks(model: Chunks) -> list[torch.nn.Module]:
    """The bare GPTModel chunk(s), without DDP / Float16Module wrappers."""
    chunks = list(model) if isinstance(model, Sequence) else [model]
    out = []
    for chunk in chunks:
        while hasattr(chunk, "module"):
            chunk = chunk.module
        out.append(chunk)
    return out


def _local_experts(chunk: torch.nn.Module) -> int:
    from megatron.core import parallel_state as ps

    experts = getattr(chunk.config, "num_moe_experts", None) or 0
    return experts // ps.get_expert_model_parallel_world_size()


def _expert_offset(chunk: torch.nn.Module) -> int:
    """Global index of this rank's first expert: its expert-parallel rank's block."""
    from megatron.core import parallel_state as ps

    return ps.get_expert_model_parallel_rank() * _local_experts(chunk)


def named_global_params(chunk: torch.nn.Module, mapping: FamilyMapping | None = None, *,
                        adapters: bool = False) -> Iterator[tuple[str, str, torch.nn.Parameter]]:
    """(local name, global megatron name, parameter) for one chunk: layer indices shifted by the stage
    offset, with `mapping` local expert indices by the expert-parallel rank's offset. Base weights, or
    with `adapters` the LoRA adapter tensors (`actor/lora.py` marks them)."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    offset = get_transformer_layer_offset(chunk.config, vp_stage=getattr(chunk, "vp_stage", None))
    experts = _expert_offset(chunk)
    for name, param in chunk.named_parameters():
        if bool(getattr(param, "is_lora", False)) != adapters:
            continue
        global_name = _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", name)
        if experts and mapping is not None and mapping.is_expert(global_name):
            global_name = mapping.with_expert_index(global_name, mapping.expert_index(global_name) + experts)
        yield name, global_name, param


def _global_params(chunk: torch.nn.Module, mapping: FamilyMapping | None = None, *,
                   adapters: bool = False) -> Iterator[tuple[str, torch.nn.Parameter]]:
    for _, name, param in named_global_params(chunk, mapping, adapters=adapters):
        yield name, param


def _is_tied_copy(chunk: torch.nn.Module, name: str) -> bool:
    return name == TIED_OUTPUT and bool(getattr(chunk, "share_embeddings_and_output_weights", False))


def _is_glu(mapping: FamilyMapping, name: str) -> bool:
    return mapping.kind(name) == "gate_up"


def _is_expert(mapping: FamilyMapping | None, name: str) -> bool:
    return mapping is not None and mapping.is_expert(name)


def _tp(expert: bool = False) -> tuple[int, int, Any]:
    """(size, rank, group) of the tensor-parallel group that splits a parameter: the expert TP group
    for expert weights, the dense one otherwise."""
    from megatron.core import parallel_state as ps

    if expert:
        return (ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank(),
                ps.get_expert_tensor_parallel_group())
    return (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
            ps.get_tensor_model_parallel_group())


def _shard(full: torch.Tensor, param: torch.nn.Parameter, glu: bool, expert: bool = False) -> torch.Tensor:
    """This TP rank's piece of a full tensor, in the layout megatron's layer expects."""
    size, rank, _ = _tp(expert)
    if size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if full.shape[dim] % size:
        raise ValueError(f"dim {dim} of shape {tuple(full.shape)} does not divide by tensor_parallel_size={size}")
    if glu:  # [gate; up] -> [gate_shard; up_shard]
        return torch.cat([torch.chunk(half, size, dim=dim)[rank] for half in torch.chunk(full, 2, dim=dim)], dim)
    return torch.chunk(full, size, dim=dim)[rank]


class _SafetensorsDir(Mapping[str, torch.Tensor]):
    """HF tensors of a checkpoint directory, read from disk only when asked for (safe_open)."""

    def __init__(self, path: Path, stack: contextlib.ExitStack) -> None:
        from safetensors import safe_open

        self._files: dict[str, Any] = {}
        for file in sorted(path.glob("*.safetensors")):
            handle = stack.enter_context(safe_open(str(file), framework="pt"))
            self._files.update(dict.fromkeys(handle.keys(), handle))
        if not self._files:
            raise FileNotFoundError(f"no *.safetensors files in {path}")

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._files[key].get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


@torch.no_grad()
def load_hf_weights(model: Chunks, mapping: FamilyMapping, hf: Path | Mapping[str, torch.Tensor]) -> None:
    """Copy HF weights (a checkpoint directory or a state dict) into this rank's shards of `model`.

    Each parameter builds its full tensor from the HF tensors it needs (read lazily from disk), keeps
    this rank's shard and drops the rest, so peak memory is one full parameter, not the checkpoint.
    """
    with contextlib.ExitStack() as stack:
        source = _SafetensorsDir(Path(hf), stack) if isinstance(hf, (str, Path)) else hf
        for chunk in bare_chunks(model):
            for name, param in _global_params(chunk, mapping):
                lookup = EMBEDDING if _is_tied_copy(chunk, name) else name
                _, full = next(mapping.from_hf([lookup], source))
                shard = _shard(full, param, _is_glu(mapping, lookup), mapping.is_expert(lookup))
                if shard.shape != param.shape:
                    raise ValueError(f"{name}: HF shard shape {tuple(shard.shape)} != Megatron {tuple(param.shape)}")
                param.copy_(shard)


def _local_value(param: torch.nn.Parameter) -> torch.Tensor:
    """A base weight as the policy uses it: with a LoRA adapter (`actor/lora.py`), W + scaling * B A."""
    delta = getattr(param, "lora_delta", None)
    return param.detach() if delta is None else (param.detach().float() + delta()).to(param.dtype)


def _gather_tp(param: torch.Tensor, glu: bool, expert: bool = False, value: torch.Tensor | None = None) -> torch.Tensor:
    """The full tensor of a TP-sharded parameter (all_gather in the TP group, GLU interleave undone);
    `value` replaces the parameter's data (same shape and sharding), e.g. a merged LoRA weight."""
    size, _, group = _tp(expert)
    value = param.detach() if value is None else value
    if size == 1 or not getattr(param, "tensor_model_parallel", False):
        return value
    dim = param.partition_dim
    parts = [torch.empty_like(value) for _ in range(size)]
    dist.all_gather(parts, value.contiguous(), group=group)
    if glu:  # each part is [gate_shard; up_shard]
        halves = [torch.chunk(p, 2, dim=dim) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(parts, dim=dim)


def _export_order(name: str) -> tuple[int, int]:
    """HF order: embedding, layers by global index, then the final norm and the output layer."""
    if name == EMBEDDING:
        return (0, 0)
    m = _LAYER.match(name)
    return (1, int(m.group(1))) if m else (2, 0)


def _pp_index(local: dict[str, tuple[torch.nn.Module, torch.nn.Parameter]],
              mapping: FamilyMapping | None) -> list[tuple[str, int, Any]]:
    """Every parameter of the whole pipeline as (global name, owning stage, (shape, dtype)), the same
    list on every rank: each stage announces what it owns via all_gather_object in the PP group.
    Expert tensors appear once per local slot (see `_export_slots`)."""
    from megatron.core import parallel_state as ps

    mine = []
    for name, (_, param) in local.items():
        size, _, _ = _tp(_is_expert(mapping, name))
        shape = list(param.shape)
        if size > 1 and getattr(param, "tensor_model_parallel", False):
            shape[param.partition_dim] *= size
        mine.append((name, (tuple(shape), param.dtype)))
    pp = ps.get_pipeline_model_parallel_world_size()
    stages: list[Any] = [mine]
    if pp > 1:
        stages = [None] * pp
        dist.all_gather_object(stages, mine, group=ps.get_pipeline_model_parallel_group())
    index = [(name, stage, meta) for stage, owned in enumerate(stages) for name, meta in owned]
    return sorted(index, key=lambda item: _export_order(item[0]))  # stable: local order within a layer


def _export_slots(model: Chunks, mapping: FamilyMapping) -> dict[str, tuple[torch.nn.Module, torch.nn.Parameter]]:
    """This rank's exported parameters by global name; expert tensors under their LOCAL expert index
    (a slot every expert-parallel rank has, holding a different global expert on each)."""
    slots = {}
    for chunk in bare_chunks(model):
        offset = _expert_offset(chunk)
        for name, param in _global_params(chunk, mapping):
            if _is_tied_copy(chunk, name):
                continue
            if mapping.is_expert(name):
                name = mapping.with_expert_index(name, mapping.expert_index(name) - offset)
            slots[name] = (chunk, param)
    return slots


def _experts_per_rank(local: dict[str, tuple[torch.nn.Module, torch.nn.Parameter]], name: str) -> int:
    """Experts per expert-parallel rank, from any chunk's config (all chunks share the model config)."""
    chunk = local[name][0] if name in local else next(iter(local.values()))[0]
    return _local_experts(chunk)


def _gather_ep(full: torch.Tensor) -> torch.Tensor:
    """[EP, *shape]: one local expert slot from every expert-parallel rank, in EP-rank order."""
    from megatron.core import parallel_state as ps

    size = ps.get_expert_model_parallel_world_size()
    if size == 1:
        return full.unsqueeze(0)
    parts = [torch.empty_like(full) for _ in range(size)]
    dist.all_gather(parts, full.contiguous(), group=ps.get_expert_model_parallel_group())
    return torch.stack(parts)


@torch.no_grad()
def export_hf_weights(model: Chunks, mapping: FamilyMapping,
                      value: ValueFn = _local_value) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the policy as HF-named FULL tensors, identically on every rank (what the vLLM refit takes).
    `value` picks what is exported per parameter: the policy weight, or e.g. its gradient (a tensor
    of the parameter's shard shape and dtype, laid out like it), which then comes back in HF layout.

    Collective: every rank must iterate the generator to the end in step. Parameters go one at a time in
    a global order all ranks agree on: the owning stage gathers the TP shards, then broadcasts the full
    tensor to the other pipeline stages. A yielded tensor may alias a live parameter (unsharded ones
    on their own stage): consumers that keep it past the next optimizer step must copy it.
    """
    from megatron.core import parallel_state as ps

    local = _export_slots(model, mapping)
    ep = ps.get_expert_model_parallel_world_size()
    for name, full in stream_full_tensors(local, mapping, value):
        if not mapping.is_expert(name):
            yield from mapping.to_hf(name, full)
            continue
        per_rank = _experts_per_rank(local, name)
        for ep_rank in range(ep):  # slot j of EP rank r is global expert r * experts_per_rank + j
            global_name = mapping.with_expert_index(name, ep_rank * per_rank + mapping.expert_index(name))
            yield from mapping.to_hf(global_name, full[ep_rank])


def stream_full_tensors(local: dict[str, tuple[torch.nn.Module, torch.nn.Parameter]],
                        mapping: FamilyMapping | None = None,
                        value: ValueFn = _local_value) -> Iterator[tuple[str, torch.Tensor]]:
    """(global megatron name, FULL tensor) for every parameter of the pipeline, in the same order on
    every rank (collective): the owning stage gathers the TP shards and broadcasts to the others. With
    the family `mapping`, GLU weights come un-interleaved and an expert slot as [EP, *shape], the slot
    of every expert-parallel rank; without it (LoRA adapters) every tensor is a plain TP-split one.
    `value` as in `export_hf_weights`."""
    from megatron.core import parallel_state as ps

    pp_rank, pp_group = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_group()
    ep = ps.get_expert_model_parallel_world_size()
    for name, stage, (shape, dtype) in _pp_index(local, mapping):
        expert = _is_expert(mapping, name)
        if stage == pp_rank:
            param = local[name][1]
            glu = mapping is not None and _is_glu(mapping, name)
            full = _gather_tp(param, glu, expert, value(param))
            if expert:
                full = _gather_ep(full)
        else:
            full = torch.empty((ep, *shape) if expert else shape, dtype=dtype,
                               device=torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
        if ps.get_pipeline_model_parallel_world_size() > 1:
            full = full.contiguous()
            dist.broadcast(full, src=dist.get_global_rank(pp_group, stage), group=pp_group)
        yield name, full
