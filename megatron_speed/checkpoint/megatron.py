"""Model, optimizer and LR schedule through megatron-core dist-checkpointing.

Every rank contributes its shards (`sharded_state_dict()`), so a checkpoint written at one TP/PP
layout loads at another: dist-checkpointing reads the slices each rank needs. The save is
synchronous (`torch_dist` backend; its writer forks helper processes and needs `psutil`).
The optimizer goes through its own `sharded_state_dict(model_sd, is_loading)`, keyed by the model
parameters it belongs to; the LR schedule is a small plain dict saved once in the common part.

Loading a model-only subset of a trainer checkpoint (what `tools/convert_megatron_to_hf.py` does)
is the same call without the optimizer: unrequested keys are ignored.

With LoRA (`actor/lora.py`) the model part is the adapters only (base weights are frozen and come
from the base model's HF folder, whose path the checkpoint's meta records): each adapter tensor is a
ShardedTensor split on the dimension its base weight is split on, or replicated, so adapters too
reshard across TP/PP layouts, and the optimizer state is keyed by them as usual.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megatron_speed.bridge.weights import bare_chunks, named_global_params
from megatron_speed.parallel.cpu_support import cpu_megatron

# The distributed optimizer's only format that loads back with the torch-Adam fallback on CPU
# (ARCHITECTURE.md); it reshards across data-parallel sizes. Ignored by the other optimizers.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _sharded(model: Any, optimizer: Any | None, scheduler: Any | None, *, loading: bool) -> dict[str, Any]:
    """Megatron-LM's layout: "model" (or "model0", "model1", ... with virtual pipeline stages),
    "optimizer" keyed by the model's sharded parameters, and the scheduler's plain dict."""
    chunks = bare_chunks(model)
    state: dict[str, Any] = ({"model": _model_state(chunks[0])} if len(chunks) == 1 else
                             {f"model{i}": _model_state(c) for i, c in enumerate(chunks)})
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=loading,
                                                          metadata=OPTIMIZER_METADATA)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    return state


def has_adapters(chunk: torch.nn.Module) -> bool:
    return any(getattr(p, "is_lora", False) for p in chunk.parameters())


def _model_state(chunk: torch.nn.Module) -> dict[str, Any]:
    return _adapter_state(chunk) if has_adapters(chunk) else chunk.sharded_state_dict()


def _adapter_state(chunk: torch.nn.Module) -> dict[str, Any]:
    """The LoRA adapters as ShardedTensors, keyed by local name, checkpoint key the global name."""
    from megatron.core.transformer.utils import (
        make_sharded_tensor_for_checkpoint,
        make_tp_sharded_tensor_for_checkpoint,
    )

    state = {}
    for local, name, param in named_global_params(chunk, adapters=True):
        if getattr(param, "tensor_model_parallel", False):
            state[local] = make_tp_sharded_tensor_for_checkpoint(param, name, tp_axis=param.partition_dim)
        else:
            state[local] = make_sharded_tensor_for_checkpoint(param, name)
    return state


def _prime_adam_state(optimizer: Any) -> None:
    """Give a never-stepped torch Adam the state of step 0 (zero moments, step 0) before a load.

    megatron-core 0.16's distributed optimizer, on the torch-Adam fallback (no TE/apex), reads a
    `step` from every parameter's state while building the sharded state dict to load INTO, and a
    fresh optimizer has no state until its first step. The load overwrites all of it."""
    inner = [getattr(o, "optimizer", None) for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    for opt in inner:
        if not isinstance(opt, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in opt.param_groups:
            for param in group["params"]:
                if not opt.state[param]:
                    opt.state[param].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(param),
                                            exp_avg_sq=torch.zeros_like(param))


def _saved_steps(tree: Any) -> set[float]:
    """The `step` values of every optimizer param group in a loaded optimizer state."""
    found: set[float] = set()
    if isinstance(tree, dict):
        for group in tree.get("param_groups", []) if isinstance(tree.get("param_groups"), list) else []:
            if isinstance(group, dict) and group.get("step") is not None:
                found.add(float(group["step"]))
        for value in tree.values():
            found |= _saved_steps(value)
    elif isinstance(tree, list | tuple):
        for value in tree:
            found |= _saved_steps(value)
    return found


def _restore_adam_steps(optimizer: Any, loaded: Any) -> None:
    """Give every parameter its own Adam `step` tensor holding the checkpoint's step count.

    megatron-core 0.16's distributed optimizer, on the torch-Adam fallback (no TE/apex), loads the step
    from its param groups into ONE tensor shared by all parameters' states (and, for the
    `dp_reshardable` format, from the state it was primed with, 0): torch's Adam then increments that
    shared tensor once per parameter per step, so bias correction is wrong from the second resumed step
    on. Measured here before this fix: the first resumed step matched, the second did not."""
    steps = _saved_steps(loaded)
    if len(steps) != 1:
        return  # plain optimizers keep per-parameter steps in their state, which torch restores as is
    (step,) = steps
    inner = [getattr(o, "optimizer", None) for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    for opt in inner:
        if isinstance(opt, torch.optim.Adam | torch.optim.AdamW):
            for state in opt.state.values():
                if "step" in state:
                    state["step"] = torch.tensor(step, dtype=state["step"].dtype, device=state["step"].device)


def save_megatron(directory: Path, model: Any, optimizer: Any | None = None, scheduler: Any | None = None) -> None:
    """Write this rank's shards of `model` (a GPTModel, DDP-wrapped or not, or the list of virtual-stage
    chunks) and, if given, the optimizer and scheduler into `directory`, which must exist and be empty
    (collective: every rank calls it)."""
    from megatron.core import dist_checkpointing

    with cpu_megatron():
        dist_checkpointing.save(_sharded(model, optimizer, scheduler, loading=False), str(directory))


def load_megatron(directory: Path, model: Any, optimizer: Any | None = None, scheduler: Any | None = None) -> None:
    """Load `directory` into `model` (and optimizer/scheduler when given), resharding to this layout.

    The weights are copied in place under no_grad: fp32 parameters are leaves that require grad, and
    the optimizer holds references to these very tensors."""
    from megatron.core import dist_checkpointing

    if optimizer is not None:
        _prime_adam_state(optimizer)
    with cpu_megatron():
        state = dist_checkpointing.load(_sharded(model, optimizer, scheduler, loading=True), str(directory))
        chunks = bare_chunks(model)
        for i, chunk in enumerate(chunks):
            with torch.no_grad():
                missing, unexpected = chunk.load_state_dict(state["model" if len(chunks) == 1 else f"model{i}"],
                                                            strict=False)
            real_missing = [k for k in missing if not k.endswith("_extra_state")
                            and (not has_adapters(chunk) or ".lora." in k)]  # LoRA: base weights are not saved
            if real_missing or unexpected:
                raise ValueError(f"{directory}: checkpoint does not fit this model: missing {real_missing[:5]}, "
                                 f"unexpected {list(unexpected)[:5]}")
        if optimizer is not None:
            with torch.no_grad():  # the distributed optimizer copies into its fp32 parameter shards
                optimizer.load_state_dict(state["optimizer"])
            _restore_adam_steps(optimizer, state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])


def is_megatron_checkpoint(directory: Path) -> bool:
    """True when `directory` holds a finished dist-checkpoint (its metadata file is written last)."""
    return (Path(directory) / "metadata.json").is_file()
