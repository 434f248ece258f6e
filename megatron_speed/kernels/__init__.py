"""Fused GPU kernels with PyTorch references of the same signature (style §6).

Importing this package does not import Triton: the kernels module is loaded on the first call that
takes the Triton path, so CPU-only installs without Triton keep working.
"""

from megatron_speed.kernels.js_advantage import (
    js_token_advantages,
    js_token_advantages_from_lengths,
    js_token_advantages_from_lengths_reference,
    js_token_advantages_reference,
    response_spans,
    spans_to_mask,
)

__all__ = ["js_token_advantages", "js_token_advantages_from_lengths", "js_token_advantages_from_lengths_reference",
           "js_token_advantages_reference", "response_spans", "spans_to_mask"]
