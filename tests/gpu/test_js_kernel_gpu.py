"""The compiled Triton James-Stein token-advantage kernel on CUDA, at RL batch sizes, against float64.

Same criterion as the interpreter tests (tests/unit/test_js_kernel.py): |a - b| <= 1e-6 * max(1, |b|)
for float32 output, every element written (outputs start as NaN). Fresh inputs every run; the seed
is in the failure message.
"""

from __future__ import annotations

import os

import pytest
import torch

from megatron_speed.algorithms.js import js
from megatron_speed.kernels import js_token_advantages, js_token_advantages_from_lengths, spans_to_mask

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (compiled Triton kernel)")]

FP32_RTOL = 1e-6
BF16_RTOL = 2.0**-8


def fresh_generator() -> tuple[int, torch.Generator]:
    seed = int.from_bytes(os.urandom(4), "little")
    return seed, torch.Generator(device="cuda").manual_seed(seed)


def offsets_of(sizes: torch.Tensor) -> torch.Tensor:
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)]).long().cuda()


def reference64(rewards: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor, variant: str) -> torch.Tensor:
    return js(rewards.double(), offsets, lambda_variant=variant)[:, None] * mask.double()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, seed: int, rtol: float, floor: float = 1.0,
                 atol: float = 0.0) -> None:
    error = (actual.double() - expected).abs()
    bad = ~(error <= rtol * expected.abs().clamp(min=floor) + atol)
    count = int(bad.sum())
    assert count == 0, (f"seed={seed}: {count}/{bad.numel()} elements off; max |diff| "
                        f"{float(error.nan_to_num(float('inf')).max()):.3g}")


@pytest.mark.parametrize("variant", ["code", "paper"])
@pytest.mark.parametrize(("n", "t", "group"), [(8192, 2048, 16), (1024, 8192, 4), (65536, 64, 8), (3000, 777, 5)])
def test_equal_groups_mask_path(n: int, t: int, group: int, variant: str) -> None:
    seed, gen = fresh_generator()
    n = n - n % group
    rewards = torch.randint(0, 2, (n,), device="cuda", generator=gen).float()
    rewards += 0.1 * torch.rand(n, device="cuda", generator=gen)
    lengths = torch.randint(0, t + 1, (n,), device="cuda", generator=gen)
    mask = torch.arange(t, device="cuda") < lengths[:, None]
    offsets = offsets_of(torch.full((n // group,), group))
    out = torch.full((n, t), float("nan"), device="cuda")
    js_token_advantages(rewards, offsets, mask, variant, out=out)
    assert_close(out, reference64(rewards, offsets, mask, variant), seed, FP32_RTOL)


def test_unequal_groups_lengths_path_and_bf16() -> None:
    seed, gen = fresh_generator()
    sizes = torch.randint(0, 33, (3000,), device="cuda", generator=gen)
    sizes[::97] = 1
    offsets = offsets_of(sizes)
    n, t = int(sizes.sum()), 1500
    rewards = torch.randn(n, device="cuda", generator=gen)
    start = torch.randint(0, t // 2, (n,), device="cuda", generator=gen)
    length = torch.randint(0, t, (n,), device="cuda", generator=gen)
    out = torch.full((n, t), float("nan"), device="cuda")
    js_token_advantages_from_lengths(rewards, offsets, start, length, t, out=out)
    expected = reference64(rewards, offsets, spans_to_mask(start, length, t), "code")
    assert_close(out, expected, seed, FP32_RTOL)
    out16 = js_token_advantages_from_lengths(rewards, offsets, start, length, t, out_dtype=torch.bfloat16)
    assert_close(out16, expected, seed, BF16_RTOL, floor=0.0, atol=2e-6)


def test_single_group_and_lone_size_one_group() -> None:
    seed, gen = fresh_generator()
    for sizes in ([4096], [1]):
        n = sum(sizes)
        rewards = torch.rand(n, device="cuda", generator=gen)
        mask = torch.ones(n, 300, dtype=torch.bool, device="cuda")
        offsets = offsets_of(torch.tensor(sizes))
        assert_close(js_token_advantages(rewards, offsets, mask), reference64(rewards, offsets, mask, "code"), seed,
                     FP32_RTOL)
