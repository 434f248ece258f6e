"""The CUDA kernel of packed attention: compiled FlexAttention with the (sequence, position) block mask
equals per-sequence SDPA, for a packed row and for a context-parallel rank's chunks over gathered
keys, forward and backward. On CPU the same rule runs per sequence (tests/unit/test_packing.py
checks FlexAttention there in eager mode only)."""

from __future__ import annotations

import pytest
import torch

from megatron_speed.actor.packed_attention import gathered_layout, masked_attention, packed_layout

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("cp", [1, 2])
def test_compiled_flex_equals_per_sequence_blocks(cp: int) -> None:
    cu = torch.tensor([0, 384, 1024, 1152, 2048], dtype=torch.int32, device="cuda")  # multiples of 2 x CP
    gen = torch.Generator(device="cuda").manual_seed(0)
    t = int(cu[-1]) // cp
    q = torch.randn(1, 8, t, 64, device="cuda", generator=gen, requires_grad=True)
    k, v = (torch.randn(1, 2, int(cu[-1]), 64, device="cuda", generator=gen, requires_grad=True) for _ in range(2))
    q_seq, q_pos = packed_layout(cu, cp, cp - 1)
    k_seq, k_pos = gathered_layout(cu, cp) if cp > 1 else (q_seq, q_pos)
    layout = (q_seq, q_pos, k_seq, k_pos)
    outs, grads = [], []
    for kernel in ("flex", "blocks"):
        out = masked_attention(q, k, v, layout, scale=0.125, gqa=True, kernel=kernel)
        (dq, dk, dv) = torch.autograd.grad(out.square().sum(), (q, k, v))
        outs.append(out.detach())
        grads.append((dq, dk, dv))
    assert torch.allclose(outs[0], outs[1], atol=2e-5, rtol=1e-4)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)
