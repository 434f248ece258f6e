"""Triton kernels for the James-Stein token advantages (`js_advantage.js_token_advantages` is the entry point).

Two launches, no host synchronisation:

1. `_group_stats_kernel` (grid over blocks of groups): each group's reward sum and its noise term
   w_k = unbiased variance / m_k (0 for groups of size <= 1), two-pass within the group, and the
   group index of every row (so the second kernel never searches the offsets).
2. `_js_tokens_kernel` (persistent grid, a few programs per SM): every program first re-reduces the
   G group statistics to the six batch totals (a loop over G in registers; G is the number of
   prompts, small next to N x T), then, for each block of rows it owns, computes λ_g, μ_{-g}, the
   leave-one-out mean and A_ij, and writes the rows' [BLOCK_R, T] output tile by tile.

Why not one launch: λ_g needs statistics of *every* group, i.e. a grid-wide reduction before the
first output element can be written. Inside one launch that needs either a grid barrier (programs
spinning on a counter, which deadlocks when not all programs are resident, and always under the
interpreter, which runs programs one after another) or every program recomputing all group statistics
from the N rewards (a serial, latency-bound gather pass per program, expected to cost more than the
few microseconds of the launch it saves; an estimate, not measured). Float atomics would also make
the result depend on the order of arrival. The persistent grid keeps the redundant re-reduction of
the G statistics (not of the N rewards) to a few hundred programs.

All arithmetic is float32 whatever the reward or output dtype; the formulas and their order follow
`megatron_speed.algorithms.js` (the centred spread, the edge-case order for λ). Malformed offsets are
not detected here (that would need a device-to-host read); they give wrong values, never an
out-of-bounds access, because group indices are clamped to [0, G).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _group_stats_kernel(rewards_ptr, offsets_ptr, sums_ptr, noise_ptr, row_group_ptr, num_groups,
                        BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr):
    """Per group: the reward sum and w = var/m (two-pass); per row: the index of its group."""
    groups = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    live = groups < num_groups
    first = tl.load(offsets_ptr + groups, mask=live, other=0)
    size = tl.load(offsets_ptr + groups + 1, mask=live, other=0) - first
    longest = tl.max(size, axis=0).to(tl.int32)
    members = tl.arange(0, BLOCK_M)
    total = tl.zeros([BLOCK_G, BLOCK_M], dtype=tl.float32)
    for m0 in range(0, longest, BLOCK_M):
        index = m0 + members[None, :]
        inside = index < size[:, None]
        total += tl.load(rewards_ptr + first[:, None] + index, mask=inside, other=0.0).to(tl.float32)
        tl.store(row_group_ptr + first[:, None] + index, groups[:, None] + 0 * index, mask=inside)
    group_sum = tl.sum(total, axis=1)
    size_f = size.to(tl.float32)
    mean = tl.div_rn(group_sum, tl.maximum(size_f, 1.0))
    squares = tl.zeros([BLOCK_G, BLOCK_M], dtype=tl.float32)
    for m0 in range(0, longest, BLOCK_M):
        index = m0 + members[None, :]
        inside = index < size[:, None]
        reward = tl.load(rewards_ptr + first[:, None] + index, mask=inside, other=0.0).to(tl.float32)
        deviation = tl.where(inside, reward - mean[:, None], 0.0)
        squares += deviation * deviation
    # w_k = (Σ (r - μ_k)² / (m_k - 1)) / m_k, defined as 0 where m_k <= 1 (it then counts nowhere).
    variance = tl.div_rn(tl.sum(squares, axis=1), tl.maximum(size_f - 1.0, 1.0))
    noise = tl.where(size > 1, tl.div_rn(variance, tl.maximum(size_f, 1.0)), 0.0)
    tl.store(sums_ptr + groups, group_sum, mask=live)
    tl.store(noise_ptr + groups, noise, mask=live)


@triton.jit
def _group_size_and_mean(offsets_ptr, sums_ptr, groups, live):
    """(m_k, μ_k) as float32 for a vector of group indices; an empty or dead lane gives (0, 0)."""
    first = tl.load(offsets_ptr + groups, mask=live, other=0)
    size = (tl.load(offsets_ptr + groups + 1, mask=live, other=0) - first).to(tl.float32)
    mean = tl.div_rn(tl.load(sums_ptr + groups, mask=live, other=0.0), tl.maximum(size, 1.0))
    return size, mean


@triton.jit
def _batch_totals(offsets_ptr, sums_ptr, noise_ptr, num_groups, BLOCK_G: tl.constexpr):
    """The batch sums every λ_g is derived from: (n, c, Σd, Σd², #groups with m >= 2, Σw).

    n counts non-empty groups, c is the mean of their means and d_k = μ_k - c (0 for empty groups):
    the same centring as the reference, so Σ d² - d_g² does not cancel when rewards are large.
    Lane-wise accumulation, then one tree sum: deterministic, order fixed by G and BLOCK_G.
    """
    lanes = tl.arange(0, BLOCK_G)
    present = tl.zeros([BLOCK_G], dtype=tl.float32)
    mean_sum = tl.zeros([BLOCK_G], dtype=tl.float32)
    with_variance = tl.zeros([BLOCK_G], dtype=tl.float32)
    noise_sum = tl.zeros([BLOCK_G], dtype=tl.float32)
    for g0 in range(0, num_groups, BLOCK_G):
        groups = g0 + lanes
        live = groups < num_groups
        size, mean = _group_size_and_mean(offsets_ptr, sums_ptr, groups, live)
        present += (size > 0.0).to(tl.float32)
        mean_sum += mean
        with_variance += (size > 1.0).to(tl.float32)
        noise_sum += tl.load(noise_ptr + groups, mask=live, other=0.0)
    n_present = tl.sum(present, axis=0)
    centre = tl.div_rn(tl.sum(mean_sum, axis=0), tl.maximum(n_present, 1.0))
    dev_sum = tl.zeros([BLOCK_G], dtype=tl.float32)
    dev_square = tl.zeros([BLOCK_G], dtype=tl.float32)
    for g0 in range(0, num_groups, BLOCK_G):
        groups = g0 + lanes
        live = groups < num_groups
        size, mean = _group_size_and_mean(offsets_ptr, sums_ptr, groups, live)
        d = tl.where(size > 0.0, mean - centre, 0.0)
        dev_sum += d
        dev_square += d * d
    return (n_present, centre, tl.sum(dev_sum, axis=0), tl.sum(dev_square, axis=0),
            tl.sum(with_variance, axis=0), tl.sum(noise_sum, axis=0))


@triton.jit
def _row_advantages(rows, live, rewards_ptr, offsets_ptr, sums_ptr, noise_ptr, row_group_ptr, num_groups,
                    n_present, centre, sum_d, sum_d2, n_variance, sum_noise, eps, force_value,
                    PAPER: tl.constexpr, FORCE: tl.constexpr):
    """A_ij for a block of rows: the leave-one-prompt-out totals, λ_g, the RLOO mean and the baseline."""
    group = tl.load(row_group_ptr + rows, mask=live, other=0)
    group = tl.minimum(tl.maximum(group, 0), num_groups - 1)  # memory safety under malformed offsets
    size, mean = _group_size_and_mean(offsets_ptr, sums_ptr, group, live)
    group_sum = tl.load(sums_ptr + group, mask=live, other=0.0)
    group_noise = tl.load(noise_ptr + group, mask=live, other=0.0)
    reward = tl.load(rewards_ptr + rows, mask=live, other=0.0).to(tl.float32)
    others = n_present - 1.0  # a row's own group is never empty
    count = tl.maximum(others, 1.0)
    d = mean - centre
    offset = tl.div_rn(sum_d - d, count)
    spread = tl.maximum(tl.div_rn(sum_d2 - d * d, count) - offset * offset, 0.0)
    noise = tl.div_rn(sum_noise - group_noise, tl.maximum(n_variance - (size > 1.0).to(tl.float32), 1.0))
    if FORCE:
        lam = tl.zeros_like(noise) + force_value
    elif PAPER:
        lam = tl.div_rn(tl.div_rn(others, others + 1.0) * noise, noise + spread + eps)
    else:
        lam = tl.div_rn(noise, noise + spread + eps)
    # Same order as the reference: size-1 groups take the other prompts' mean, then "no other prompt" wins.
    lam = tl.where(size == 1.0, 1.0, lam)
    lam = tl.where(others == 0.0, 0.0, lam)
    loo = tl.div_rn(group_sum - reward, tl.maximum(size - 1.0, 1.0))
    baseline = (1.0 - lam) * loo + lam * (centre + offset)
    return reward - baseline


@triton.jit
def _write_rows(advantage, rows, live, mask_ptr, start_ptr, length_ptr, out_ptr, num_tokens, out_stride,
                mask_stride_row, mask_stride_token, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr):
    """Broadcast one advantage per row over its response tokens, [BLOCK_R, BLOCK_T] tiles along the row.

    Mask layout: A * mask (the reference's `A.unsqueeze(-1) * response_mask`). Span layout: A on
    [start, start + length), 0 elsewhere, and no mask is read. Every element of the first
    `out_stride` columns is written: columns [num_tokens, out_stride) are the output's padding to a
    multiple of 16 (0 on the mask layout; outside the caller's view either way), which makes every
    store mask constant over 16 columns, so stores are 128-bit (`st.global.v4`) wherever the
    row stride allows it. All offsets are int64 products (N x T may exceed 2^31 elements).
    """
    row_base = rows.to(tl.int64)
    if not HAS_MASK:
        span_first = tl.load(start_ptr + rows, mask=live, other=0)
        span_last = span_first + tl.load(length_ptr + rows, mask=live, other=0)
    for t0 in range(0, out_stride, BLOCK_T):
        cols = t0 + tl.arange(0, BLOCK_T)
        if HAS_MASK:
            inside = live[:, None] & (cols[None, :] < num_tokens)
            mask_offsets = row_base[:, None] * mask_stride_row + cols.to(tl.int64)[None, :] * mask_stride_token
            token_mask = tl.load(mask_ptr + mask_offsets, mask=inside, other=0)
            value = advantage[:, None] * token_mask.to(tl.float32)
        else:
            on = (cols[None, :] >= span_first[:, None]) & (cols[None, :] < span_last[:, None])
            value = tl.where(on, advantage[:, None], 0.0)
        out_offsets = row_base[:, None] * out_stride + cols[None, :]
        tl.store(out_ptr + out_offsets, value.to(out_ptr.dtype.element_ty),
                 mask=live[:, None] & (cols[None, :] < out_stride))


@triton.jit
def _js_tokens_kernel(rewards_ptr, offsets_ptr, sums_ptr, noise_ptr, row_group_ptr, mask_ptr, start_ptr,
                      length_ptr, out_ptr, num_rows, num_groups, num_tokens, out_stride, mask_stride_row,
                      mask_stride_token, eps, force_value, HAS_MASK: tl.constexpr, PAPER: tl.constexpr,
                      FORCE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
    """Persistent: batch totals once per program, then its row blocks (block = pid, pid + P, ...)."""
    n_present, centre, sum_d, sum_d2, n_variance, sum_noise = _batch_totals(
        offsets_ptr, sums_ptr, noise_ptr, num_groups, BLOCK_G)
    for block in range(tl.program_id(0), tl.cdiv(num_rows, BLOCK_R), tl.num_programs(0)):
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        live = rows < num_rows
        advantage = _row_advantages(rows, live, rewards_ptr, offsets_ptr, sums_ptr, noise_ptr, row_group_ptr,
                                    num_groups, n_present, centre, sum_d, sum_d2, n_variance, sum_noise, eps,
                                    force_value, PAPER, FORCE)
        _write_rows(advantage, rows, live, mask_ptr, start_ptr, length_ptr, out_ptr, num_tokens, out_stride,
                    mask_stride_row, mask_stride_token, HAS_MASK, BLOCK_T)


@dataclass(frozen=True)
class TokenLayout:
    """Where each row's advantage goes: a mask [N, T] (any dtype, multiplied), or spans [start, start+length)."""

    num_tokens: int
    mask: Tensor | None = None
    start: Tensor | None = None
    length: Tensor | None = None


@dataclass(frozen=True)
class _Tiling:
    """Block sizes and grid of one call; chosen from shapes only (no device reads)."""

    group_block: int  # groups per program of the statistics kernel
    member_block: int  # members of each group loaded at once
    stats_warps: int  # warps per program of the statistics kernel
    totals_block: int  # lanes of the batch re-reduction
    row_block: int
    token_block: int
    token_warps: int  # warps per program of the token kernel
    programs: int  # cap on the persistent grid


@dataclass(frozen=True)
class _Limits:
    """Upper bounds for `_Tiling`, per backend (elements unless said otherwise)."""

    rows: int  # row block of the token kernel
    tokens: int  # token block
    vector_bytes: int  # bytes each lane stores per row of a token tile
    totals: int  # lanes of the batch re-reduction
    totals_per_thread: int  # ... and at most this many per thread
    members: int  # member block of the statistics kernel
    stats: int  # groups x members per statistics program
    programs: int  # persistent programs per SM (GPU) or in all (interpreter), at `num_warps` warps each
    num_warps: int


# GPU: a token tile is 4 rows x (32 lanes x one 128-bit vector x up to 8 warps), so every row width
# compiles to the same per-lane work (4 rows x one 16-byte vector per token block) and each lane's 4 rows
# are adjacent (span loads are 128-bit too). Narrow rows take fewer warps per program and proportionally
# more programs per SM (32 resident warps either way, the register budget the compile test checks). A
# constant 4096-element tile would put 32 rows on 8 warps for 128-token rows: 4 non-adjacent rows per
# lane, scalar span loads and 87-94 registers on sm_90. Interpreter: tiny blocks and 3 programs, so small
# inputs exercise every loop of both kernels.
_GPU = _Limits(rows=4, tokens=1024, vector_bytes=16, totals=1024, totals_per_thread=4, members=1024, stats=1024,
               programs=4, num_warps=8)
_INTERPRETER = _Limits(rows=4, tokens=16, vector_bytes=16, totals=8, totals_per_thread=8, members=4, stats=8,
                       programs=3, num_warps=1)


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _tiling(limits: _Limits, num_rows: int, width: int, num_groups: int, element_size: int, *,
            sm_count: int = 1) -> _Tiling:
    """Block sizes from shapes only. `width` is the output's row stride (every column of it is written);
    the member block follows the mean group size N/G."""
    mean_group = -(-num_rows // max(num_groups, 1))
    member_block = min(triton.next_power_of_2(max(mean_group, 1)), limits.members)
    per_warp = 32 * max(1, limits.vector_bytes // element_size)  # one vector per lane and row
    token_block = min(max(triton.next_power_of_2(max(width, 1)), per_warp), limits.tokens)
    token_warps = max(1, min(limits.num_warps, token_block // per_warp))
    totals_block = min(triton.next_power_of_2(max(num_groups, 1)), limits.totals,
                       limits.totals_per_thread * 32 * token_warps)
    return _Tiling(group_block=max(1, limits.stats // member_block), member_block=member_block,
                   stats_warps=limits.num_warps, totals_block=totals_block,
                   row_block=min(limits.rows, triton.next_power_of_2(max(num_rows, 1))), token_block=token_block,
                   token_warps=token_warps,
                   programs=limits.programs * (limits.num_warps // token_warps) * sm_count)


def _empty(size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Workspace allocation (a seam: tests replace it to poison the workspace)."""
    return torch.empty(size, dtype=dtype, device=device)


@dataclass(frozen=True)
class Launch:
    """One kernel launch, fully bound: `kernel[grid](*args, **constants)`."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    constants: dict[str, Any]


def plan_launches(rewards: Tensor, group_offsets: Tensor, layout: TokenLayout, out: Tensor, *, paper: bool,
                  eps: float, force_lambda: float | None, limits: _Limits | None = None,
                  sm_count: int = 1) -> list[Launch]:
    """The two launches of one call, with their workspace; no device reads, so it also runs on meta tensors
    (the ahead-of-time compile test builds exactly these launches for sm_80/sm_90 on a CPU machine).

    `out` is [N, >= T] with unit column stride; its row stride is the width the kernel fills.
    """
    if limits is None:
        limits = _GPU if rewards.device.type == "cuda" else _INTERPRETER
    num_rows, num_groups, num_tokens = rewards.numel(), group_offsets.numel() - 1, layout.num_tokens
    tiling = _tiling(limits, num_rows, out.stride(0), num_groups, out.element_size(), sm_count=sm_count)
    sums = _empty(num_groups, torch.float32, rewards.device)
    noise = _empty(num_groups, torch.float32, rewards.device)
    row_group = _empty(num_rows, torch.int32, rewards.device)
    stats = Launch(_group_stats_kernel, (triton.cdiv(num_groups, tiling.group_block),),
                   (rewards, group_offsets, sums, noise, row_group, num_groups),
                   {"BLOCK_G": tiling.group_block, "BLOCK_M": tiling.member_block, "num_warps": tiling.stats_warps})
    has_mask = layout.mask is not None
    mask = layout.mask if has_mask else out  # placeholders are never read: HAS_MASK prunes that path
    start = layout.start if not has_mask else group_offsets
    length = layout.length if not has_mask else group_offsets
    mask_strides = mask.stride() if has_mask else (0, 0)
    tokens = Launch(_js_tokens_kernel, (min(triton.cdiv(num_rows, tiling.row_block), tiling.programs),),
                    (rewards, group_offsets, sums, noise, row_group, mask, start, length, out, num_rows, num_groups,
                     num_tokens, out.stride(0), mask_strides[0], mask_strides[1], eps,
                     0.0 if force_lambda is None else force_lambda),
                    {"HAS_MASK": has_mask, "PAPER": paper, "FORCE": force_lambda is not None,
                     "BLOCK_G": tiling.totals_block, "BLOCK_R": tiling.row_block, "BLOCK_T": tiling.token_block,
                     "num_warps": tiling.token_warps})
    return [stats, tokens]


def launch_js_tokens(rewards: Tensor, group_offsets: Tensor, layout: TokenLayout, out: Tensor, *,
                     paper: bool, eps: float, force_lambda: float | None) -> None:
    """Write A_ij onto `out` [N, >= T] (unit column stride; columns past T are padding the kernel also
    fills). Inputs are validated by the caller; N, T, G > 0."""
    sm_count = 1
    if rewards.device.type == "cuda":
        sm_count = _sm_count(rewards.device.index if rewards.device.index is not None else torch.cuda.current_device())
    for launch in plan_launches(rewards, group_offsets, layout, out, paper=paper, eps=eps, force_lambda=force_lambda,
                                sm_count=sm_count):
        launch.kernel[launch.grid](*launch.args, **launch.constants)


__all__ = ["Launch", "TokenLayout", "launch_js_tokens", "plan_launches"]
