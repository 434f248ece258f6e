"""Run megatron-core 0.16 on CPU over gloo: the one adapter for its CUDA-only calls.

megatron-core assumes a CUDA device in a handful of places. On a machine without one we redirect
them, and nothing else, while `cpu_megatron()` is active:

* literal `device="cuda"` / `torch.cuda.current_device()` tensor factories (schedules' token
  counters, p2p buffers, grad buffers, optimizer scalars) -> a `TorchFunctionMode` maps any CUDA
  device argument to CPU and turns `Tensor.cuda()` into a no-op;
* `Tensor.type()` checks that expect `torch.cuda.*Tensor` (optimizer, grad clipping) -> the same mode
  reports CPU tensors under their CUDA type names;
* `torch.cuda.current_device`, `synchronize`, `get/set_rng_state`, `manual_seed`, and
  `megatron.core.tensor_parallel.random`'s CUDA RNG helpers -> CPU equivalents (the CPU generator
  stands in for the CUDA one, so the RNG tracker's fork/restore semantics still hold);
* `torch.cuda.Stream` / `current_stream` / `stream` / events used for overlap -> inert stand-ins;
* the MoE all-to-all (`tensor_parallel.mappings._AllToAll`): its forward allocates on
  `torch.cuda.current_device()` and also runs inside autograd's backward, where the mode is not
  active; and its split sizes, which megatron turns into numpy arrays only when it moves them off a
  GPU, reach `all_to_all_single` as tensors, which it rejects -> a CPU forward with list splits.

Deliberately left out: sequence parallelism (needs TE or apex norms), fused kernels, CUDA graphs.
The adapter is a no-op when CUDA is available: `cpu_megatron()` then yields without patching.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    """Maps CUDA device arguments to CPU and CPU tensor type names to their CUDA names."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = _CPU
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if func in (torch.Tensor.to,) and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _InertStream:
    """Stands in for `torch.cuda.Stream`: work runs synchronously on CPU."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event: Any = None) -> _InertEvent:
        return _InertEvent()


class _InertEvent:
    """Stands in for `torch.cuda.Event` (the MoE all-to-all dispatcher waits on one)."""

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass


def _set_cpu_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _get_cpu_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _splits(sizes: Any) -> list[int] | None:
    return None if sizes is None else [int(s) for s in sizes]


def _all_to_all_forward(ctx: Any, group: Any, input: torch.Tensor, output_split_sizes: Any,
                        input_split_sizes: Any) -> torch.Tensor:
    """megatron's `_AllToAll.forward` on CPU tensors (same saved context, so its backward still works)."""
    ctx.group, ctx.output_split_sizes, ctx.input_split_sizes = group, output_split_sizes, input_split_sizes
    if group.size() == 1:
        return input
    input = input.contiguous()
    out_splits = _splits(output_split_sizes)
    rows = input.shape[0] if out_splits is None else sum(out_splits)
    output = input.new_empty((rows, *input.shape[1:]))
    dist.all_to_all_single(output, input, output_split_sizes=out_splits,
                           input_split_sizes=_splits(input_split_sizes), group=group)
    return output


def _patches() -> list[Any]:
    from megatron.core.tensor_parallel import mappings
    from megatron.core.tensor_parallel import random as tp_random

    cuda = torch.cuda
    return [
        mock.patch.object(cuda, "current_device", lambda: 0),
        mock.patch.object(cuda, "synchronize", lambda *a, **k: None),
        mock.patch.object(cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state()),
        mock.patch.object(cuda, "set_rng_state", lambda state, *a, **k: torch.set_rng_state(state)),
        mock.patch.object(cuda, "manual_seed", lambda seed: None),
        mock.patch.object(cuda, "Stream", _InertStream),
        mock.patch.object(cuda, "current_stream", lambda *a, **k: _InertStream()),
        mock.patch.object(cuda, "stream", lambda *a, **k: contextlib.nullcontext()),
        mock.patch.object(cuda, "device_count", lambda: 1),
        mock.patch.object(tp_random, "_set_cuda_rng_state", _set_cpu_rng_state),
        mock.patch.object(tp_random, "_get_cuda_rng_state", _get_cpu_rng_state),
        mock.patch.object(mappings._AllToAll, "forward", staticmethod(_all_to_all_forward)),
    ]


@contextlib.contextmanager
def cpu_megatron() -> Iterator[None]:
    """Activate the adapter for the duration of the block when no CUDA device is present."""
    if torch.cuda.is_available():
        yield
        return
    with contextlib.ExitStack() as stack:
        for patch in _patches():
            stack.enter_context(patch)
        stack.enter_context(_CudaToCpu())
        yield
