"""The Triton James-Stein token-advantage kernel, run by the Triton interpreter on CPU tensors.

Triton decides at import time whether every `@triton.jit` function (its own `triton.language`
helpers included) is compiled or interpreted, so TRITON_INTERPRET=1 cannot be switched on for one
test module of a process that may already have imported Triton (vLLM does) or that runs the compiled
GPU tests next. The kernel checks therefore run in one spawned worker process whose first act is to
set the flag; this process never sets it. Each test sends a check (a module-level function) there.

Every run draws fresh inputs from a seed made here (it is in each failure message; call the check
directly in a process with TRITON_INTERPRET=1 to replay it) and compares with `algorithms.js.js`
in float64 broadcast over the tokens. Outputs are pre-filled with NaN and the kernels' workspace is
poisoned, so an element the kernel fails to write fails. Float32 output: |a - b| <= 1e-6 * max(1, |b|).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from megatron_speed.algorithms.js import js
from megatron_speed.kernels import (
    js_advantage,
    js_token_advantages,
    js_token_advantages_from_lengths,
    js_token_advantages_reference,
    spans_to_mask,
)

FP32_RTOL = 1e-6
# bf16 keeps 8 significant bits. Compiled Triton rounds float32 -> bf16 to nearest (error <= 2^-8 relative,
# tests/gpu checks that); the Triton 3.9 interpreter truncates instead (its `cast_impl` ignores the
# rounding mode), which can cost one whole ulp: 2^-7 relative.
BF16_RTOL = 2.0**-7
FLAG_BEFORE = os.environ.get("TRITON_INTERPRET")

Interpreter = Callable[..., object]


def _poisoned_empty(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Workspace that breaks the result if any element is read before the kernel writes it."""
    if dtype.is_floating_point:
        return torch.full((size,), float("nan"), dtype=dtype, device=device)
    return torch.full((size,), 2**30, dtype=dtype, device=device)


def _enter_interpreter_mode() -> None:
    """Worker initializer: the flag goes on before this process first imports Triton."""
    assert "triton" not in sys.modules, "Triton was imported before TRITON_INTERPRET could be set"
    os.environ["TRITON_INTERPRET"] = "1"
    from megatron_speed.kernels import js_triton

    js_triton._empty = _poisoned_empty


@pytest.fixture(scope="module")
def interpreter() -> Iterator[Interpreter]:
    """Run `check(*args)` in the interpreter worker and re-raise its failure here."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing inherited from this one
    with ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_enter_interpreter_mode) as pool:
        yield lambda check, *args: pool.submit(check, *args).result()


def interpreted_kernels_in_worker() -> str:
    from megatron_speed.kernels import js_triton

    return type(js_triton._group_stats_kernel).__name__


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
        raise AssertionError(
            f"seed={seed}: {int(bad.sum())}/{bad.numel()} elements off (rtol {rtol}); first at [{row}, {col}]: "
            f"kernel {float(actual[row, col])!r} vs float64 {float(expected[row, col])!r}; "
            f"max |diff| {float(error.nan_to_num(float('inf')).max()):.3g}")


# ---------------------------------------------------------------- checks (run in the interpreter worker)


def check_mask_case(seed: int, sizes: list[int], t: int, kind: str, variant: str = "code",
                    force_lambda: float | None = None, strided: bool = False,
                    offsets_dtype: torch.dtype = torch.long) -> None:
    """One mask-path comparison on inputs drawn from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    offsets = offsets_of(sizes, offsets_dtype)
    rewards = random_rewards(sum(sizes), kind, gen)
    mask = random_mask(sum(sizes), t, gen, strided)
    out = nan_out(sum(sizes), t)
    result = js_token_advantages(rewards, offsets, mask, variant, force_lambda=force_lambda, out=out,
                                 force_triton=True)
    assert result.data_ptr() == out.data_ptr(), "the result must be the `out` buffer"
    assert_close(result, reference64(rewards, offsets.long(), mask, variant, force_lambda), seed)


def check_random_unequal_groups(seed: int, kind: str, variant: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    sizes = random_sizes(gen, groups=int(torch.randint(9, 14, (1,), generator=gen)), max_size=7, allow_empty=True)
    check_mask_case(seed, sizes, int(torch.randint(17, 40, (1,), generator=gen)), kind, variant)


def check_lone_sample_keeps_its_reward(seed: int, variant: str) -> None:
    """No other prompt and no other sample: the baseline is 0 and A = r, bit for bit."""
    rewards = random_rewards(1, "normal", torch.Generator().manual_seed(seed))
    out = js_token_advantages(rewards, offsets_of([1]), torch.ones(1, 3, dtype=torch.bool), variant,
                              out=nan_out(1, 3), force_triton=True)
    assert torch.equal(out, rewards.expand(1, 3)), f"seed={seed}: {out} != {rewards}"


def random_spans(n: int, t: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Starts in [-2, T) and lengths in [-1, T + 3): empty, clipped and over-long spans all occur."""
    start = torch.randint(-2, t, (n,), generator=gen)
    length = torch.randint(-1, t + 3, (n,), generator=gen)
    length[0], start[-1], length[-1] = 0, t - 1, t  # an empty row and a span that runs past T
    return start, length


def check_lengths_case(seed: int, variant: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    sizes = random_sizes(gen, groups=10, max_size=6, allow_empty=True)
    n, t = sum(sizes), 19
    rewards, offsets = random_rewards(n, "uniform", gen), offsets_of(sizes)
    start, length = random_spans(n, t, gen)
    out = js_token_advantages_from_lengths(rewards, offsets, start, length.int(), t, variant, out=nan_out(n, t),
                                           force_triton=True)
    assert_close(out, reference64(rewards, offsets, spans_to_mask(start, length, t), variant), seed)


def check_bf16_case(seed: int) -> None:
    """bf16 output through both layouts: within one bf16 ulp of the float64 value (see BF16_RTOL)."""
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
                                           out=nan_out(n, t, torch.bfloat16), force_triton=True)
    assert_close(out, reference64(rewards, offsets, spans_to_mask(start, length, t), "paper"), seed,
                 rtol=BF16_RTOL, floor=0.0, atol=2e-6)


def check_padded_output_rows(seed: int) -> None:
    """Without `out`, the Triton path fills a buffer whose rows are padded to 16 elements (aligned rows,
    128-bit stores) and returns its [N, T] view, for both layouts and a T that is not a multiple of 16."""
    gen = torch.Generator().manual_seed(seed)
    sizes = random_sizes(gen, groups=7, max_size=5, allow_empty=False)
    n, t = sum(sizes), 19
    rewards, offsets, mask = random_rewards(n, "normal", gen), offsets_of(sizes), random_mask(n, t, gen)
    out = js_token_advantages(rewards, offsets, mask, force_triton=True)
    assert out.shape == (n, t) and out.stride() == (32, 1), out.stride()
    assert_close(out, reference64(rewards, offsets, mask), seed)
    start, length = random_spans(n, t, gen)
    out = js_token_advantages_from_lengths(rewards, offsets, start, length, t, force_triton=True)
    assert out.shape == (n, t) and out.stride() == (32, 1), out.stride()
    assert_close(out, reference64(rewards, offsets, spans_to_mask(start, length, t)), seed)


# ---------------------------------------------------------------- tests


def test_padded_output_rows(interpreter: Interpreter) -> None:
    interpreter(check_padded_output_rows, fresh_seed())


def test_response_spans_describe_the_trainers_masks() -> None:
    """The trainer passes (start, length) of its one-span-per-row masks: they give back the same mask."""
    from megatron_speed.curriculum.batch import build_train_batch
    from megatron_speed.kernels import response_spans
    from megatron_speed.records import Completion, PromptRecord, RolloutGroup

    def group(uid: str, prompt: int, responses: list[int]) -> RolloutGroup:
        completions = [Completion(token_ids=tuple(range(3, 3 + m)), logprobs=(-0.5,) * m, text="x",
                                  finish_reason="stop") for m in responses]
        g = RolloutGroup(prompt=PromptRecord(uid=uid, prompt="p", answer="1"), prompt_token_ids=tuple(range(prompt)),
                         phase="train", policy_version=0, completions=completions)
        g.rewards = [1.0] * len(responses)
        return g

    batch = build_train_batch([group("a", 5, [1, 7, 3]), group("b", 2, [9, 4])], pad_id=0)
    start, length = response_spans(batch.response_mask)
    assert torch.equal(spans_to_mask(start, length, batch.response_mask.shape[1]), batch.response_mask.bool())
    assert length.tolist() == [1, 7, 3, 9, 4]
    empty_start, empty_length = response_spans(torch.zeros(2, 5))
    assert empty_start.tolist() == [0, 0] and empty_length.tolist() == [0, 0]


@pytest.mark.parametrize("variant", ["code", "paper"])
@pytest.mark.parametrize("kind", ["uniform", "binary", "normal"])
def test_unequal_groups_with_size_one_and_empty_groups(interpreter: Interpreter, kind: str, variant: str) -> None:
    interpreter(check_random_unequal_groups, fresh_seed(), kind, variant)


def test_equal_groups_n_not_a_multiple_of_the_row_block_and_strided_int32_inputs(interpreter: Interpreter) -> None:
    interpreter(check_mask_case, fresh_seed(), [4] * 9 + [3], 21, "uniform", "code", None, True, torch.int32)


@pytest.mark.parametrize("variant", ["code", "paper"])
@pytest.mark.parametrize("sizes", [[6], [1], [3, 0, 0]], ids=["one-group", "lone-size-1", "one-non-empty"])
def test_a_single_prompt_is_plain_rloo(interpreter: Interpreter, sizes: list[int], variant: str) -> None:
    interpreter(check_mask_case, fresh_seed(), sizes, 5, "normal", variant)
    if sizes == [1]:
        interpreter(check_lone_sample_keeps_its_reward, fresh_seed(), variant)


@pytest.mark.parametrize("sizes", [[4, 4, 4], [3, 1, 5, 2]], ids=["equal-groups", "unequal-groups"])
def test_all_equal_rewards_give_zero_spread_and_no_nan(interpreter: Interpreter, sizes: list[int]) -> None:
    interpreter(check_mask_case, fresh_seed(), sizes, 9, "equal")


def test_single_token_per_row(interpreter: Interpreter) -> None:
    interpreter(check_mask_case, fresh_seed(), [3, 1, 0, 5, 2, 4, 1, 6, 2, 3, 5, 1], 1, "uniform")


@pytest.mark.parametrize("force_lambda", [0.0, 0.3, 1.0])
def test_force_lambda(interpreter: Interpreter, force_lambda: float) -> None:
    interpreter(check_mask_case, fresh_seed(), [3, 1, 4, 2, 5], 7, "uniform", "code", force_lambda)


@pytest.mark.parametrize("variant", ["code", "paper"])
def test_lengths_path_matches_the_mask_it_describes(interpreter: Interpreter, variant: str) -> None:
    interpreter(check_lengths_case, fresh_seed(), variant)


def test_bf16_output_on_both_paths(interpreter: Interpreter) -> None:
    interpreter(check_bf16_case, fresh_seed())


def test_the_worker_runs_interpreted_kernels_and_this_process_keeps_its_flag(interpreter: Interpreter) -> None:
    assert interpreter(interpreted_kernels_in_worker) == "InterpretedFunction"
    assert os.environ.get("TRITON_INTERPRET") == FLAG_BEFORE


# ---------------------------------------------------------------- host side (this process, no Triton)


def test_cpu_tensors_take_the_reference_path_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_launch(*args: object) -> None:
        raise AssertionError("the Triton path ran for CPU tensors without force_triton")

    monkeypatch.setattr(js_advantage, "_run", no_launch)
    gen = torch.Generator().manual_seed(fresh_seed())
    offsets, rewards = offsets_of([3, 1, 4]), random_rewards(8, "uniform", gen)
    mask = random_mask(8, 6, gen)
    out = js_token_advantages(rewards, offsets, mask, "paper", torch.bfloat16)
    assert torch.equal(out, js_token_advantages_reference(rewards, offsets, mask, "paper", torch.bfloat16))
    start, length = random_spans(8, 6, gen)
    out = js_token_advantages_from_lengths(rewards, offsets, start, length, 6, out=nan_out(8, 6))
    assert torch.equal(out, js_token_advantages_reference(rewards, offsets, spans_to_mask(start, length, 6)))


def test_empty_shapes_launch_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "megatron_speed.kernels.js_triton", None)  # importing it would fail
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
    ({"group_offsets": torch.tensor([0])}, "no group"),
    ({"out": torch.empty(4, 3, dtype=torch.bfloat16)}, "out must be"),
])
def test_bad_arguments_are_rejected_with_the_rule(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"rewards": torch.rand(4), "group_offsets": offsets_of([2, 2]),
                                    "response_mask": torch.ones(4, 3, dtype=torch.bool), **kwargs}
    with pytest.raises(ValueError, match=message):
        js_token_advantages(**arguments, force_triton=True)  # type: ignore[arg-type]
