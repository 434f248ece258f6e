"""The Triton James-Stein token-advantage kernel, run by the Triton interpreter on CPU tensors.

The kernels module is loaded a second time, under its own name, with TRITON_INTERPRET=1 set only
while it is imported (Triton reads the flag when `@triton.jit` decorates a function). The shared
`megatron_speed.kernels.js_triton` is never touched, so compiled GPU tests in the same process and
other modules that import Triton are unaffected. A fixture points the public API at the copy.

Every run draws fresh inputs (the seed is in each failure message; `check_mask_case(seed, ...)`
replays one) and compares with `algorithms.js.js` in float64 broadcast over the tokens. Outputs
are pre-filled with NaN and the workspace is poisoned, so an element the kernel fails to write fails.
Relative error: |a - b| <= 1e-6 * max(1, |b|) for float32 output.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

import megatron_speed.kernels as kernels
from megatron_speed.algorithms.js import js
from megatron_speed.kernels import (
    js_token_advantages,
    js_token_advantages_from_lengths,
    js_token_advantages_reference,
    spans_to_mask,
)

FP32_RTOL = 1e-6
BF16_RTOL = 2.0**-8  # bf16 keeps 8 significant bits: rounding the float32 value moves it by <= 2^-8 relative


def _load_interpreted_kernels() -> ModuleType:
    """A private copy of `kernels/js_triton.py` whose kernels were decorated under TRITON_INTERPRET=1."""
    path = Path(kernels.__file__).with_name("js_triton.py")
    name = "megatron_speed.kernels._js_triton_interpreted"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return module


FLAG_BEFORE = os.environ.get("TRITON_INTERPRET")
INTERPRETED = _load_interpreted_kernels()


def _poisoned_empty(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Workspace that breaks the result if any element is read before the kernel writes it."""
    if dtype.is_floating_point:
        return torch.full((size,), float("nan"), dtype=dtype, device=device)
    return torch.full((size,), 2**30, dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def interpreted_kernels(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """Route the public API's Triton path to the interpreted copy, with a poisoned workspace."""
    monkeypatch.setitem(sys.modules, "megatron_speed.kernels.js_triton", INTERPRETED)
    monkeypatch.setattr(kernels, "js_triton", INTERPRETED, raising=False)
    monkeypatch.setattr(INTERPRETED, "_empty", _poisoned_empty)
    yield INTERPRETED


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def offsets_of(sizes: list[int], dtype: torch.dtype = torch.long) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(sizes, dtype=torch.long).cumsum(0).tolist()], dtype=dtype)


def random_rewards(n: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """float32 rewards of one of the shapes RL produces: binary, bounded, Gaussian, or all equal."""
    if kind == "binary":
        return torch.randint(0, 2, (n,), generator=gen).float()
    if kind == "uniform":
        return torch.rand(n, generator=gen)
    if kind == "normal":
        return torch.randn(n, generator=gen)
    if kind == "equal":
        return torch.full((n,), float(torch.rand(1, generator=gen)))
    raise ValueError(kind)


def random_sizes(gen: torch.Generator, groups: int, max_size: int, allow_empty: bool) -> list[int]:
    """Unequal group sizes that always include a size-1 group (and an empty one if allowed)."""
    sizes = torch.randint(0 if allow_empty else 1, max_size + 1, (groups,), generator=gen).tolist()
    sizes[int(torch.randint(0, groups, (1,), generator=gen))] = 1
    if allow_empty and groups > 2:
        sizes[int(torch.randint(0, groups, (1,), generator=gen))] = 0
    if sum(sizes) == 0:
        sizes[0] = 1
    return sizes


def random_mask(n: int, t: int, gen: torch.Generator, strided: bool = False) -> torch.Tensor:
    """Bool [N, T] with ragged rows and at least one all-False row; optionally a non-contiguous view."""
    mask = torch.rand(n, t, generator=gen) < torch.rand(n, 1, generator=gen)
    mask[int(torch.randint(0, n, (1,), generator=gen))] = False
    return mask.t().contiguous().t() if strided else mask


def reference64(rewards: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor, variant: str = "code",
                force_lambda: float | None = None) -> torch.Tensor:
    """The float64 ground truth: `js` on float64 rewards, times the mask."""
    advantages = js(rewards.double(), offsets, lambda_variant=variant, force_lambda=force_lambda)
    return advantages[:, None] * mask.double()


def nan_out(n: int, t: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.full((n, t), float("nan"), dtype=dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, seed: int, rtol: float = FP32_RTOL,
                 floor: float = 1.0, atol: float = 0.0) -> None:
    """|a - b| <= rtol * max(floor, |b|) + atol everywhere (NaN fails); the message names the seed."""
    assert actual.shape == expected.shape, f"seed={seed}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = (actual.double() - expected).abs()
    bad = ~(error <= rtol * expected.abs().clamp(min=floor) + atol)
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        pytest.fail(f"seed={seed}: {int(bad.sum())}/{bad.numel()} elements off (rtol {rtol}); first at "
                    f"[{row}, {col}]: kernel {float(actual[row, col])!r} vs float64 {float(expected[row, col])!r}; "
                    f"max |diff| {float(error.nan_to_num(float('inf')).max()):.3g}")


def check_mask_case(seed: int, sizes: list[int], t: int, kind: str, variant: str = "code",
                    force_lambda: float | None = None, strided: bool = False,
                    offsets_dtype: torch.dtype = torch.long) -> None:
    """One mask-path comparison on inputs drawn from `seed` (call it directly to replay a failure)."""
    gen = torch.Generator().manual_seed(seed)
    offsets = offsets_of(sizes, offsets_dtype)
    rewards = random_rewards(sum(sizes), kind, gen)
    mask = random_mask(sum(sizes), t, gen, strided)
    out = nan_out(sum(sizes), t)
    result = js_token_advantages(rewards, offsets, mask, variant, force_lambda=force_lambda, out=out,
                                 force_triton=True)
    assert result.data_ptr() == out.data_ptr()
    assert_close(result, reference64(rewards, offsets.long(), mask, variant, force_lambda), seed)


@pytest.mark.parametrize("variant", ["code", "paper"])
@pytest.mark.parametrize("kind", ["uniform", "binary", "normal"])
def test_unequal_groups_with_size_one_and_empty_groups(kind: str, variant: str) -> None:
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    sizes = random_sizes(gen, groups=int(torch.randint(9, 14, (1,), generator=gen)), max_size=7, allow_empty=True)
    t = int(torch.randint(17, 40, (1,), generator=gen))
    check_mask_case(seed, sizes, t, kind, variant)


def test_equal_groups_n_not_a_multiple_of_the_row_block_and_strided_int32_inputs() -> None:
    seed = fresh_seed()
    check_mask_case(seed, [4] * 9 + [3], t=21, kind="uniform", strided=True, offsets_dtype=torch.int32)


@pytest.mark.parametrize("variant", ["code", "paper"])
@pytest.mark.parametrize("sizes", [[6], [1], [3, 0, 0]], ids=["one-group", "lone-size-1", "one-non-empty"])
def test_a_single_prompt_is_plain_rloo(sizes: list[int], variant: str) -> None:
    seed = fresh_seed()
    check_mask_case(seed, sizes, t=5, kind="normal", variant=variant)
    if sizes == [1]:  # no other prompt and no other sample: the baseline is 0, A = r
        gen = torch.Generator().manual_seed(seed)
        rewards = random_rewards(1, "normal", gen)
        out = js_token_advantages(rewards, offsets_of(sizes), torch.ones(1, 3, dtype=torch.bool), variant,
                                  force_triton=True)
        assert torch.equal(out, rewards.expand(1, 3))


@pytest.mark.parametrize("sizes", [[4, 4, 4], [3, 1, 5, 2]], ids=["equal-groups", "unequal-groups"])
def test_all_equal_rewards_give_zero_spread_and_no_nan(sizes: list[int]) -> None:
    seed = fresh_seed()
    check_mask_case(seed, sizes, t=9, kind="equal")


def test_single_token_per_row() -> None:
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    check_mask_case(seed, random_sizes(gen, groups=12, max_size=5, allow_empty=True), t=1, kind="uniform")


@pytest.mark.parametrize("force_lambda", [0.0, 0.3, 1.0])
def test_force_lambda(force_lambda: float) -> None:
    seed = fresh_seed()
    check_mask_case(seed, [3, 1, 4, 2, 5], t=7, kind="uniform", force_lambda=force_lambda)


def random_spans(n: int, t: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Starts in [-2, T) and lengths in [-1, T + 3): empty, clipped and over-long spans all occur."""
    start = torch.randint(-2, t, (n,), generator=gen)
    length = torch.randint(-1, t + 3, (n,), generator=gen)
    length[0], start[-1], length[-1] = 0, t - 1, t  # an empty row and a span that runs past T
    return start, length


@pytest.mark.parametrize("variant", ["code", "paper"])
def test_lengths_path_matches_the_mask_it_describes(variant: str) -> None:
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    sizes = random_sizes(gen, groups=10, max_size=6, allow_empty=True)
    n, t = sum(sizes), 19
    rewards, offsets = random_rewards(n, "uniform", gen), offsets_of(sizes)
    start, length = random_spans(n, t, gen)
    out = js_token_advantages_from_lengths(rewards, offsets, start, length.int(), t, variant, out=nan_out(n, t),
                                           force_triton=True)
    assert_close(out, reference64(rewards, offsets, spans_to_mask(start, length, t), variant), seed)


def test_bf16_output_on_both_paths() -> None:
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    sizes = random_sizes(gen, groups=9, max_size=6, allow_empty=False)
    n, t = sum(sizes), 13
    rewards, offsets, mask = random_rewards(n, "normal", gen), offsets_of(sizes), random_mask(n, t, gen)
    out = js_token_advantages(rewards, offsets, mask, out_dtype=torch.bfloat16, out=nan_out(n, t, torch.bfloat16),
                              force_triton=True)
    assert out.dtype == torch.bfloat16
    assert_close(out, reference64(rewards, offsets, mask), seed, rtol=BF16_RTOL, floor=0.0, atol=2e-6)
    start, length = random_spans(n, t, gen)
    out = js_token_advantages_from_lengths(rewards, offsets, start, length, t, "paper", torch.bfloat16,
                                           force_triton=True)
    assert_close(out, reference64(rewards, offsets, spans_to_mask(start, length, t), "paper"), seed,
                 rtol=BF16_RTOL, floor=0.0, atol=2e-6)


def test_cpu_tensors_take_the_reference_path_by_default(interpreted_kernels: ModuleType,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_launch(*args: object, **kwargs: object) -> None:
        raise AssertionError("the Triton path ran for CPU tensors without force_triton")

    monkeypatch.setattr(interpreted_kernels, "launch_js_tokens", no_launch)
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    offsets, rewards = offsets_of([3, 1, 4]), random_rewards(8, "uniform", gen)
    mask = random_mask(8, 6, gen)
    out = js_token_advantages(rewards, offsets, mask, "paper", torch.bfloat16)
    assert torch.equal(out, js_token_advantages_reference(rewards, offsets, mask, "paper", torch.bfloat16))
    start, length = random_spans(8, 6, gen)
    out = js_token_advantages_from_lengths(rewards, offsets, start, length, 6)
    assert torch.equal(out, js_token_advantages_reference(rewards, offsets, spans_to_mask(start, length, 6)))


def test_empty_shapes_launch_nothing(interpreted_kernels: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(interpreted_kernels, "launch_js_tokens", None)  # calling it would raise
    out = js_token_advantages(torch.rand(4), offsets_of([4]), torch.ones(4, 0, dtype=torch.bool), force_triton=True)
    assert out.shape == (4, 0)
    out = js_token_advantages(torch.rand(0), offsets_of([]), torch.ones(0, 5, dtype=torch.bool), force_triton=True)
    assert out.shape == (0, 5)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"lambda_variant": "site"}, "lambda_variant"),
    ({"eps": -1.0}, "eps"),
    ({"force_lambda": 1.5}, "force_lambda"),
    ({"out_dtype": torch.int32}, "out_dtype"),
    ({"response_mask": torch.ones(5, 3, dtype=torch.bool)}, "response_mask"),
    ({"response_mask": torch.ones(4, dtype=torch.bool)}, "2-D"),
    ({"group_offsets": torch.tensor([0.0, 4.0])}, "group_offsets"),
    ({"out": torch.empty(4, 3, dtype=torch.bfloat16)}, "out must be"),
])
def test_bad_arguments_are_rejected_with_the_rule(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"rewards": torch.rand(4), "group_offsets": offsets_of([2, 2]),
                                    "response_mask": torch.ones(4, 3, dtype=torch.bool), **kwargs}
    with pytest.raises(ValueError, match=message):
        js_token_advantages(**arguments, force_triton=True)  # type: ignore[arg-type]


def test_interpreter_flag_does_not_leak() -> None:
    assert os.environ.get("TRITON_INTERPRET") == FLAG_BEFORE
    assert INTERPRETED._group_stats_kernel.__class__.__name__ == "InterpretedFunction"
    assert "megatron_speed.kernels._js_triton_interpreted" in sys.modules
