"""James-Stein token advantages in one fused pass: rewards [N] + groups -> per-token advantages [N, T].

`js_token_advantages` equals `broadcast_to_tokens(js(rewards, group_offsets, ...), response_mask)`
(`megatron_speed.algorithms.js`, every edge case included: unequal and empty groups, size-1 groups,
a single group, zero spread) cast to `out_dtype`. On CUDA it runs the Triton kernels of
`js_triton` (two launches, float32 arithmetic, no host synchronisation); on CPU it runs that
PyTorch reference unless `force_triton=True` (the CPU tests, under TRITON_INTERPRET=1).
`js_token_advantages_from_lengths` takes per-row response spans instead of a mask, so the kernel
reads no [N, T] input at all.

Deliberately left out: the offsets are not validated on the Triton path (that needs a device-to-host
read; validate them where they are built, with `algorithms.groups.check_group_offsets`), and there
is no backward (advantages are constants of the loss).
"""

from __future__ import annotations

from typing import get_args

import torch
from torch import Tensor

from megatron_speed.algorithms.advantages import broadcast_to_tokens
from megatron_speed.algorithms.js import LambdaVariant, js


def js_token_advantages_reference(rewards: Tensor, group_offsets: Tensor, response_mask: Tensor,
                                  lambda_variant: LambdaVariant = "code", out_dtype: torch.dtype = torch.float32,
                                  *, eps: float = 1e-6, force_lambda: float | None = None) -> Tensor:
    """The PyTorch reference of `js_token_advantages`: `js` (float64 inside) then the token broadcast."""
    advantages = js(rewards, group_offsets.to(rewards.device), lambda_variant=lambda_variant,
                    force_lambda=force_lambda, eps=eps)
    return broadcast_to_tokens(advantages, response_mask).to(out_dtype)


def spans_to_mask(response_start: Tensor, response_length: Tensor, num_tokens: int) -> Tensor:
    """Bool [N, T]: True on tokens [start, start + length) of each row (clipped to [0, T))."""
    tokens = torch.arange(num_tokens, device=response_start.device)
    start = response_start.long().unsqueeze(1)
    return (tokens >= start) & (tokens < start + response_length.long().unsqueeze(1))


def js_token_advantages_from_lengths_reference(
        rewards: Tensor, group_offsets: Tensor, response_start: Tensor, response_length: Tensor, num_tokens: int,
        lambda_variant: LambdaVariant = "code", out_dtype: torch.dtype = torch.float32, *, eps: float = 1e-6,
        force_lambda: float | None = None) -> Tensor:
    """The PyTorch reference of `js_token_advantages_from_lengths` (the spans made into a mask)."""
    mask = spans_to_mask(response_start, response_length, num_tokens)
    return js_token_advantages_reference(rewards, group_offsets, mask, lambda_variant, out_dtype, eps=eps,
                                         force_lambda=force_lambda)


def _check_options(lambda_variant: str, out_dtype: torch.dtype, eps: float, force_lambda: float | None) -> None:
    """Host-side checks of the plain-value arguments (the same rules as `algorithms.js`)."""
    if lambda_variant not in get_args(LambdaVariant):
        raise ValueError(f"lambda_variant must be one of {list(get_args(LambdaVariant))}, got {lambda_variant!r}")
    if not out_dtype.is_floating_point:
        raise ValueError(f"out_dtype must be a floating-point dtype, got {out_dtype}")
    if eps < 0:
        raise ValueError(f"js eps must be >= 0, got {eps}")
    if force_lambda is not None and not 0.0 <= force_lambda <= 1.0:
        raise ValueError(f"force_lambda must lie in [0, 1], got {force_lambda}")


def _check_shapes(rewards: Tensor, group_offsets: Tensor, per_row: dict[str, Tensor]) -> None:
    """Shape, dtype and device checks that need no device read. `per_row`: name -> tensor with dim 0 = N."""
    if rewards.dim() != 1 or not rewards.dtype.is_floating_point:
        raise ValueError(f"rewards must be a 1-D floating-point tensor [N], got {rewards.dtype} "
                         f"{tuple(rewards.shape)}")
    if group_offsets.dim() != 1 or group_offsets.numel() < 1 or group_offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"group_offsets must be a 1-D int32/int64 tensor [G+1], got {group_offsets.dtype} "
                         f"{tuple(group_offsets.shape)}")
    if group_offsets.numel() == 1 and rewards.numel() > 0:
        raise ValueError(f"group_offsets has no group (shape [1]) but there are N={rewards.numel()} rewards")
    for name, tensor in per_row.items():
        if tensor.shape[:1] != rewards.shape:
            raise ValueError(f"{name} must have N={rewards.numel()} rows, got shape {tuple(tensor.shape)}")
        if tensor.device != rewards.device:
            raise ValueError(f"{name} is on {tensor.device} but rewards are on {rewards.device}; move them together")


def _output(out: Tensor | None, rewards: Tensor, num_tokens: int, out_dtype: torch.dtype, *,
            padded: bool) -> tuple[Tensor, Tensor]:
    """(buffer the kernel fills, [N, T] result): `out` after checking it (both), or a new uninitialised
    buffer whose rows are padded to a multiple of 16 elements when `padded` (the Triton path: aligned
    rows let every store be 128 bits wide), returned as its [N, T] view."""
    shape = (rewards.numel(), num_tokens)
    if out is None:
        width = -(-num_tokens // 16) * 16 if padded else num_tokens
        buffer = torch.empty((rewards.numel(), width), dtype=out_dtype, device=rewards.device)
        return buffer, buffer[:, :num_tokens]
    if tuple(out.shape) != shape or out.dtype != out_dtype or out.device != rewards.device \
            or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {out_dtype} tensor of shape {shape} on {rewards.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device} (contiguous={out.is_contiguous()})")
    return out, out


def _run(rewards: Tensor, group_offsets: Tensor, buffer: Tensor, num_tokens: int, lambda_variant: LambdaVariant,
         eps: float, force_lambda: float | None, *, mask: Tensor | None = None, start: Tensor | None = None,
         length: Tensor | None = None) -> None:
    """Launch the Triton kernels on `buffer` (imported here: Triton is needed only on this path)."""
    if buffer.numel() == 0:
        return
    from megatron_speed.kernels import js_triton

    layout = js_triton.TokenLayout(num_tokens=num_tokens, mask=mask, start=start, length=length)
    js_triton.launch_js_tokens(rewards.contiguous(), group_offsets.to(rewards.device).contiguous(), layout, buffer,
                               paper=lambda_variant == "paper", eps=eps, force_lambda=force_lambda)


def response_spans(response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(start, length) [N] int64 of masks that are ONE span per row (as `curriculum.batch` builds them):
    start = first set position (0 for an empty row), length = number of set positions. Device ops only."""
    on = response_mask != 0
    length = on.sum(dim=1)
    start = torch.where(length > 0, on.to(torch.uint8).argmax(dim=1), torch.zeros_like(length))
    return start, length


def js_token_advantages(rewards: Tensor, group_offsets: Tensor, response_mask: Tensor,
                        lambda_variant: LambdaVariant = "code", out_dtype: torch.dtype = torch.float32, *,
                        eps: float = 1e-6, force_lambda: float | None = None, out: Tensor | None = None,
                        force_triton: bool = False) -> Tensor:
    """Per-token James-Stein advantages [N, T]: A_ij (`algorithms.js.js`) times the response mask.

    rewards [N] float; group_offsets [G+1] int (CSR, groups may differ in size or be empty; moved to
    the rewards' device if needed); response_mask [N, T] (bool or 0/1, any strides). `out`, if
    given, is a contiguous [N, T] `out_dtype` buffer that is fully overwritten and returned; otherwise the
    Triton path returns the [N, T] view of a buffer whose rows are padded to 16 elements (aligned rows).
    CUDA tensors (or `force_triton`) take the Triton path; CPU tensors the PyTorch reference.
    """
    _check_options(lambda_variant, out_dtype, eps, force_lambda)
    _check_shapes(rewards, group_offsets, {"response_mask": response_mask})
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be 2-D [N, T], got shape {tuple(response_mask.shape)}")
    triton_path = rewards.is_cuda or force_triton
    buffer, result = _output(out, rewards, response_mask.shape[1], out_dtype, padded=triton_path)
    if not triton_path:
        return result.copy_(js_token_advantages_reference(rewards, group_offsets, response_mask, lambda_variant,
                                                          out_dtype, eps=eps, force_lambda=force_lambda))
    _run(rewards, group_offsets, buffer, response_mask.shape[1], lambda_variant, eps, force_lambda, mask=response_mask)
    return result


def js_token_advantages_from_lengths(rewards: Tensor, group_offsets: Tensor, response_start: Tensor,
                                     response_length: Tensor, num_tokens: int,
                                     lambda_variant: LambdaVariant = "code", out_dtype: torch.dtype = torch.float32,
                                     *, eps: float = 1e-6, force_lambda: float | None = None,
                                     out: Tensor | None = None, force_triton: bool = False) -> Tensor:
    """`js_token_advantages` with row i's response on tokens [start_i, start_i + length_i) of T.

    response_start, response_length: [N] int32/int64 on the rewards' device. Spans are clipped to
    [0, T); a length <= 0 gives an all-zero row. No [N, T] input is read: the only N x T traffic is
    the output write.
    """
    _check_options(lambda_variant, out_dtype, eps, force_lambda)
    _check_shapes(rewards, group_offsets, {"response_start": response_start, "response_length": response_length})
    for name, tensor in (("response_start", response_start), ("response_length", response_length)):
        if tensor.dim() != 1 or tensor.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be a 1-D int32/int64 tensor [N], got {tensor.dtype} {tuple(tensor.shape)}")
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    triton_path = rewards.is_cuda or force_triton
    buffer, result = _output(out, rewards, num_tokens, out_dtype, padded=triton_path)
    if not triton_path:
        return result.copy_(js_token_advantages_from_lengths_reference(
            rewards, group_offsets, response_start, response_length, num_tokens, lambda_variant, out_dtype,
            eps=eps, force_lambda=force_lambda))
    _run(rewards, group_offsets, buffer, num_tokens, lambda_variant, eps, force_lambda,
         start=response_start.contiguous(), length=response_length.contiguous())
    return result


__all__ = ["js_token_advantages", "js_token_advantages_from_lengths", "js_token_advantages_from_lengths_reference",
           "js_token_advantages_reference", "response_spans", "spans_to_mask"]
