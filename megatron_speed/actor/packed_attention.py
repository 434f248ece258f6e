"""Attention over packed sequences (THD) and its context-parallel split, without TransformerEngine.

A packed micro-batch is one row of sequences laid end to end; megatron describes it with
`cu_seqlens_padded` (global offsets of each sequence, padded to a multiple of 2 x CP). With context
parallelism each sequence of padded length P is cut into 2·CP chunks of P/(2·CP) tokens and CP rank
r holds chunks r and 2·CP−1−r (megatron's load-balanced split: every rank gets the same share of
the causal work), so a rank's local row is, per sequence, those two chunks back to back.

Everything here follows from two facts per position: which sequence it belongs to and its position
inside that sequence. A query attends to a key iff both are in the same sequence and the key's
position is not after the query's. With CP the keys and values of the whole row are all-gathered
over the CP group (`gather_sequence`, whose backward sums the key/value gradients of every rank and
hands each rank its own slice), and the mask is built from the gathered positions, so the causal
offsets between chunks come out right by construction.

Kernels (`masked_attention`): on CPU SDPA per sequence with that sequence's causal block of the
mask (the block-diagonal mask without its empty blocks; sequences of one length share one batched
call); on CUDA PyTorch's FlexAttention (`torch.nn.attention.flex_attention` with a block mask built
from the same (sequence, position) rule, compiled by `torch.compile`), which skips fully masked
blocks, so cross-sequence work and the O(T²) mask are never materialised. FlexAttention has no
dropout: with attention dropout the CPU kernel runs (the recipes train with attention dropout 0).

Deliberately left out: ring exchange of K/V (the all-gather holds the whole row's K/V on every CP
rank, which is what CP without TE needs to be exact; TE's ring attention is the scalable path) and
sliding windows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F


def packed_layout(cu_seqlens_padded: torch.Tensor, cp_size: int = 1, cp_rank: int = 0) -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
    """(sequence index, position in the sequence) of every position of CP rank `cp_rank`'s local row.

    `cu_seqlens_padded` [n+1] are global offsets; each sequence length must divide by 2·cp_size when
    cp_size > 1. With cp_size = 1 the positions simply restart at 0 for every sequence."""
    lengths = (cu_seqlens_padded[1:] - cu_seqlens_padded[:-1]).long()
    if cp_size > 1 and bool((lengths % (2 * cp_size)).any()):
        raise ValueError(f"packed sequence lengths {lengths.tolist()} must be multiples of 2 x CP = {2 * cp_size}")
    local = lengths // cp_size
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), local)
    starts = torch.cumsum(local, 0) - local
    j = torch.arange(int(local.sum()), device=lengths.device) - torch.repeat_interleave(starts, local)
    chunk = torch.repeat_interleave(local // 2, local) if cp_size > 1 else torch.repeat_interleave(local, local)
    if cp_size == 1:
        return seq, j
    # first half: chunk cp_rank; second half: chunk 2·cp−1−cp_rank
    pos = torch.where(j < chunk, cp_rank * chunk + j, (2 * cp_size - 1 - cp_rank) * chunk + (j - chunk))
    return seq, pos


def gathered_layout(cu_seqlens_padded: torch.Tensor, cp_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layout of the CP-gathered row: every rank's local layout, in rank order."""
    parts = [packed_layout(cu_seqlens_padded, cp_size, r) for r in range(cp_size)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def allowed(q_seq: torch.Tensor, q_pos: torch.Tensor, k_seq: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Boolean [Tq, Tk]: True where the query may attend the key (same sequence, key not later)."""
    return (q_seq[:, None] == k_seq[None, :]) & (k_pos[None, :] <= q_pos[:, None])


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 over a group; backward sums every rank's gradient and keeps this rank's slice."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group, ctx.world, ctx.rank = group, dist.get_world_size(group), dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)  # every rank's queries contributed to every key
        n = grad.shape[0] // ctx.world
        return grad[ctx.rank * n:(ctx.rank + 1) * n], None


def gather_sequence(x: torch.Tensor, group: Any) -> torch.Tensor:
    """`x` [t, ...] of every rank of `group`, concatenated in rank order, with gradients flowing back."""
    return _GatherSequence.apply(x, group)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: tuple[torch.Tensor, ...], *, scale: float,
          gqa: bool, compiled: bool) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q_seq, q_pos, k_seq, k_pos = layout

    def mask_mod(b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return (q_seq[q_idx] == k_seq[kv_idx]) & (k_pos[kv_idx] <= q_pos[q_idx])

    # compiled: the block mask is built block by block instead of from a dense [Tq, Tk] mask
    block_mask = create_block_mask(mask_mod, None, None, q.shape[2], k.shape[2], device=q.device, _compile=compiled)
    kernel = _compiled_flex() if compiled else flex_attention
    return kernel(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)


_COMPILED: list[Any] = []


def _compiled_flex() -> Any:
    if not _COMPILED:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED.append(torch.compile(flex_attention, dynamic=True))
    return _COMPILED[0]


def _pick(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[1, h, T, d] at positions `index` [g, n] -> [g, h, n, d]."""
    return t[0][:, index].transpose(0, 1)


def _by_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: tuple[torch.Tensor, ...], *,
                 scale: float, gqa: bool, dropout: float) -> torch.Tensor:
    """SDPA per sequence over its own keys: the block-diagonal mask without its zero blocks,
    O(sum of L_i^2 / CP) work instead of O(T^2). A rank's queries of one sequence are contiguous, and
    sequences of one length share their mask (positions depend on the length only), so each distinct
    length is one batched SDPA call."""
    q_seq, q_pos, k_seq, k_pos = layout
    order = torch.argsort(k_seq, stable=True)
    k_counts = torch.bincount(k_seq, minlength=int(q_seq.max()) + 1).tolist()
    q_counts = torch.bincount(q_seq, minlength=len(k_counts)).tolist()
    groups: dict[tuple[int, int], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    q_start, k_start = 0, 0
    for nq, nk in zip(q_counts, k_counts):
        if nq:
            members = groups.setdefault((nq, nk), ([], []))
            members[0].append(torch.arange(q_start, q_start + nq, device=q.device))
            members[1].append(order[k_start:k_start + nk])
        q_start, k_start = q_start + nq, k_start + nk
    outs, placed = [], []
    for q_rows, k_rows in groups.values():
        qi, ki = torch.stack(q_rows), torch.stack(k_rows)  # [g, nq], [g, nk]
        mask = k_pos[ki[0]][None, :] <= q_pos[qi[0]][:, None]
        out = F.scaled_dot_product_attention(_pick(q, qi), _pick(k, ki), _pick(v, ki), attn_mask=mask,
                                             dropout_p=dropout, scale=scale, enable_gqa=gqa)
        outs.append(out.transpose(0, 1).reshape(q.shape[1], -1, q.shape[3]))  # [h, g * nq, d]
        placed.append(qi.reshape(-1))
    inverse = torch.argsort(torch.cat(placed))
    return torch.cat(outs, dim=1)[:, inverse].unsqueeze(0)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: tuple[torch.Tensor, ...], *,
                     scale: float, gqa: bool, dropout: float = 0.0, kernel: str = "auto") -> torch.Tensor:
    """Attention of q [1, h, Tq, d] over k, v [1, g, Tk, d] under the (sequence, position) rule.

    `layout` = (q_seq, q_pos, k_seq, k_pos). `kernel`: "blocks" (SDPA per sequence, each with its
    causal block of the mask), "dense" (one SDPA call with the whole [Tq, Tk] boolean mask; the
    plain reference), "flex" (FlexAttention; compiled on CUDA, eager elsewhere, which is what the
    CPU tests check) or "auto" (flex on CUDA without dropout, else blocks)."""
    if kernel == "auto":
        kernel = "flex" if q.is_cuda and dropout == 0.0 else "blocks"
    if kernel == "flex":
        return _flex(q, k, v, layout, scale=scale, gqa=gqa, compiled=q.is_cuda)
    if kernel == "blocks":
        return _by_sequence(q, k, v, layout, scale=scale, gqa=gqa, dropout=dropout)
    mask = allowed(*layout)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=gqa)
