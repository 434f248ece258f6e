"""Reward shaping applied to scalar rewards before advantages are computed.

Deliberately left out: any per-token reward; the recipes reproduced here score whole responses.
"""

from __future__ import annotations

import torch
from torch import Tensor


def overlong_penalty(lengths: Tensor, *, max_length: int, buffer_length: int, factor: float) -> Tensor:
    """DAPO's soft overlong punishment per response, [N] float, to ADD to the reward before advantages.

    With expected = max_length - buffer_length, the penalty is
    min(-(length - expected) / buffer_length * factor, 0): 0 up to `expected` tokens, then falling
    linearly to -factor at `max_length`. Lengths above `max_length` (impossible when generation is
    capped there) are not clamped and give less than -factor, as in DAPO's reward manager. The result
    is float64 if `lengths` is, else the default float dtype.
    """
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be 1-D [N], got shape {tuple(lengths.shape)}")
    if not 0 < buffer_length <= max_length:
        raise ValueError(f"buffer_length must lie in (0, max_length={max_length}], got {buffer_length}")
    if factor < 0:
        raise ValueError(f"overlong penalty factor must be >= 0, got {factor}")
    dtype = lengths.dtype if lengths.dtype.is_floating_point else torch.get_default_dtype()
    expected = max_length - buffer_length
    penalty = -(lengths.to(dtype) - expected) / buffer_length * factor
    return penalty.clamp(max=0.0)


__all__ = ["overlong_penalty"]
