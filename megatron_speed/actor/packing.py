"""Sequence packing: variable-length sequences laid end to end in rows of `optim.micro_batch_tokens`.

Placement (`balanced_bins`): the step's sequences are binned for ALL data-parallel ranks at once (every
rank computes the same plan from the same lengths). The number of micro-batches is what
first-fit-decreasing needs at the token budget, rounded up to a multiple of the data-parallel size;
the sequences, longest first, then each go to the least-loaded micro-batch that still has room
(LPT), and the micro-batches go to ranks the same way, with the same count per rank. A sequence
longer than the budget gets a micro-batch of its own (a sequence is never split across micro-batches;
context parallelism splits it across ranks instead).

Layout (`build_packed`): a micro-batch is ONE row [1, T] holding its sequences back to back, each
padded to a multiple of 2·CP (CP = context-parallel size; nothing is padded without CP). Everything
the loss needs is position-aligned: at position p of a sequence, `labels` is the token at p+1 and
`mask` / `old_logprobs` / `advantages` / `ref_logprobs` are the batch's per-token values for that
token (the batch's column p). Positions restart at 0 for every sequence. With CP > 1 each rank keeps
chunks r and 2·CP−1−r of every sequence (megatron's load-balanced split, see packed_attention.py),
and its per-token outputs go back to (row, column) of the batch through `rows` / `cols`.

Per-sequence losses stay exact: the loss aggregates by `segment` (the sequence of each position)
with each whole sequence's token count in `segment_tokens`, and only CP rank 0 counts a sequence
(`segment_counted`), so sums over data- and context-parallel ranks give the global token mean (or
sequence mean) exactly as the padded layout does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class PackedMicroBatch:
    tokens: torch.Tensor  # [1, T] this context-parallel rank's input ids
    labels: torch.Tensor  # [1, T] the next token at each position (0 where there is none)
    positions: torch.Tensor  # [1, T] position inside its sequence (restarts at 0)
    mask: torch.Tensor  # [1, T] position-aligned response mask
    old_logprobs: torch.Tensor  # [1, T]
    advantages: torch.Tensor  # [1, T]
    ref_logprobs: torch.Tensor | None  # [1, T], only with a KL penalty
    segment: torch.Tensor  # [T] index of each position's sequence in this micro-batch
    segment_tokens: torch.Tensor  # [n] masked tokens of each whole sequence (all CP ranks)
    segment_counted: torch.Tensor  # [n] bool: this rank counts the sequence (CP rank 0)
    rows: torch.Tensor  # [T] batch row of each position (-1: padding)
    cols: torch.Tensor  # [T] per-token column of each position (-1: no next token)
    cu_seqlens: torch.Tensor  # [n+1] int32 offsets of the real sequences (global, before CP)
    cu_seqlens_padded: torch.Tensor  # [n+1] int32 offsets as laid out (padded to 2·CP)
    real_tokens: int  # positions of this rank holding a real token (for the padding fraction)

    def packed_seq_params(self) -> Any:
        """megatron-core's THD description of this row (read by RoPE and core attention)."""
        from megatron.core.packed_seq_params import PackedSeqParams

        longest = int((self.cu_seqlens_padded[1:] - self.cu_seqlens_padded[:-1]).max())
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
                               cu_seqlens_q_padded=self.cu_seqlens_padded, cu_seqlens_kv_padded=self.cu_seqlens_padded,
                               max_seqlen_q=longest, max_seqlen_kv=longest)


def padded_length(length: int, cp: int) -> int:
    """A sequence's length as laid out: a multiple of 2·CP with context parallelism, else as is."""
    return length if cp == 1 else math.ceil(length / (2 * cp)) * 2 * cp


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> int:
    """Number of bins first-fit-decreasing needs (an over-long item takes a bin of its own)."""
    loads: list[int] = []
    for length in sorted(lengths, reverse=True):
        for b, load in enumerate(loads):
            if load + length <= capacity:
                loads[b] += length
                break
        else:
            loads.append(length)
    return len(loads)


def _least_loaded(lengths: Sequence[int], bins: int, capacity: int) -> list[list[int]] | None:
    """LPT: items longest first, each into the least-loaded bin with room; None if one does not fit."""
    loads, members = [0] * bins, [[] for _ in range(bins)]
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        fits = [b for b in range(bins) if loads[b] + lengths[i] <= capacity or loads[b] == 0]
        if not fits:
            return None
        b = min(fits, key=lambda k: (loads[k], k))
        loads[b] += lengths[i]
        members[b].append(i)
    return members


def balanced_bins(lengths: Sequence[int], *, capacity: int, ranks: int = 1,
                  min_per_rank: int = 1) -> list[list[list[int]]]:
    """Sequence indices of each micro-batch of each data-parallel rank: `[rank][micro_batch] -> [i, ...]`.

    Every rank gets the same number of micro-batches (at least `min_per_rank`; the interleaved
    pipeline needs PP) and none is empty, so there must be at least ranks x min_per_rank sequences."""
    n = len(lengths)
    if n < ranks * min_per_rank:
        raise ValueError(f"{n} sequences cannot fill {min_per_rank} micro-batch(es) on each of {ranks} "
                         "data-parallel ranks; train on more sequences per optimizer step")
    most = n // ranks  # every micro-batch holds at least one sequence
    per_rank = min(most, max(min_per_rank, math.ceil(first_fit_decreasing(lengths, capacity) / ranks)))
    members = _least_loaded(lengths, ranks * per_rank, capacity)
    while members is None and per_rank < most:  # LPT needs a bin more than first-fit did
        per_rank += 1
        members = _least_loaded(lengths, ranks * per_rank, capacity)
    if members is None:  # equal counts per rank force two sequences together past the budget
        members = _least_loaded(lengths, ranks * per_rank, sum(lengths))
    assert members is not None
    load = [sum(lengths[i] for i in m) for m in members]
    out: list[list[list[int]]] = [[] for _ in range(ranks)]
    totals = [0] * ranks
    for b in sorted(range(len(members)), key=lambda k: (-load[k], k)):
        r = min((r for r in range(ranks) if len(out[r]) < per_rank), key=lambda k: (totals[k], k))
        out[r].append(sorted(members[b]))
        totals[r] += load[b]
    return out


def _cp_index(padded: Sequence[int], cp: int, rank: int, device: torch.device) -> torch.Tensor:
    """Positions of the packed row that CP rank `rank` keeps: chunks rank and 2·cp−1−rank of each sequence."""
    parts, start = [], 0
    for length in padded:
        chunk = length // (2 * cp)
        for c in (rank, 2 * cp - 1 - rank):
            parts.append(torch.arange(start + c * chunk, start + (c + 1) * chunk, device=device))
        start += length
    return torch.cat(parts)


def build_packed(group: Sequence[int], lengths: Sequence[int], tokens: torch.Tensor, *per_token: torch.Tensor | None,
                 cp: int = 1, cp_rank: int = 0, width: int | None = None) -> PackedMicroBatch:
    """One packed micro-batch of rows `group` of `tokens` [N, S] (per-token tensors [N, S-1], or None).

    `lengths[r]` = tokens row r needs. `width` (a multiple of 2·CP, at least the packed length) pads the
    row with a sequence of padding, so micro-batches can share one shape (interleaved pipeline)."""
    device = tokens.device
    padded = [padded_length(lengths[r], cp) for r in group]
    filler = 0 if width is None else width - sum(padded)
    if filler < 0 or filler % (2 * cp if cp > 1 else 1):
        raise ValueError(f"width {width} cannot hold packed sequences of {sum(padded)} tokens in 2 x CP steps")
    fields: dict[str, list[torch.Tensor]] = {k: [] for k in ("tokens", "labels", "positions", "rows", "cols", "real")}
    extra: list[list[torch.Tensor]] = [[] for _ in per_token]
    for r, pad in zip(group, padded):
        n = lengths[r]
        tail = torch.zeros(pad - n + 1, dtype=tokens.dtype, device=device)
        fields["tokens"].append(torch.cat([tokens[r, :n], tail[1:]]))
        fields["labels"].append(torch.cat([tokens[r, 1:n], tail]))
        fields["positions"].append(torch.arange(pad, device=device))
        fields["rows"].append(torch.full((pad,), r, dtype=torch.long, device=device))
        fields["cols"].append(torch.cat([torch.arange(n - 1, device=device),
                                         torch.full((pad - n + 1,), -1, dtype=torch.long, device=device)]))
        fields["real"].append(torch.arange(pad, device=device) < n)
        for k, t in enumerate(per_token):
            if t is not None:
                extra[k].append(torch.cat([t[r, :n - 1], t.new_zeros(pad - n + 1)]))
    sizes, real_sizes = list(padded), [lengths[r] for r in group]
    if filler:
        sizes.append(filler)
        real_sizes.append(filler)
        fields["tokens"].append(torch.zeros(filler, dtype=tokens.dtype, device=device))
        fields["labels"].append(torch.zeros(filler, dtype=tokens.dtype, device=device))
        fields["positions"].append(torch.arange(filler, device=device))
        fields["rows"].append(torch.full((filler,), -1, dtype=torch.long, device=device))
        fields["cols"].append(torch.full((filler,), -1, dtype=torch.long, device=device))
        fields["real"].append(torch.zeros(filler, dtype=torch.bool, device=device))
        for k, t in enumerate(per_token):
            if t is not None:
                extra[k].append(t.new_zeros(filler))
    segment = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
    keep = _cp_index(sizes, cp, cp_rank, device) if cp > 1 else None

    def local(parts: list[torch.Tensor]) -> torch.Tensor:
        row = torch.cat(parts)
        return row if keep is None else row[keep]

    full = {k: local(v) for k, v in fields.items()}
    per_pos = [local(parts) if parts else None for parts in extra]
    mask = per_pos[0] if per_pos else torch.zeros(len(full["tokens"]), device=device)
    seg_tokens = [float(per_token[0][r, :lengths[r] - 1].gt(0).sum()) if per_token and per_token[0] is not None
                  else 0.0 for r in group] + ([0.0] if filler else [])

    def offsets(values: list[int]) -> torch.Tensor:
        return torch.tensor([0, *torch.tensor(values).cumsum(0).tolist()], dtype=torch.int32, device=device)

    return PackedMicroBatch(
        tokens=full["tokens"][None], labels=full["labels"][None], positions=full["positions"][None],
        mask=mask[None], old_logprobs=_row(per_pos, 1, mask), advantages=_row(per_pos, 2, mask),
        ref_logprobs=per_pos[3][None] if len(per_pos) > 3 and per_pos[3] is not None else None,
        segment=segment if keep is None else segment[keep], segment_tokens=torch.tensor(seg_tokens, device=device),
        segment_counted=torch.full((len(sizes),), cp_rank == 0, device=device),
        rows=full["rows"], cols=full["cols"], cu_seqlens=offsets(real_sizes), cu_seqlens_padded=offsets(sizes),
        real_tokens=int(full["real"].sum()))


def _row(per_pos: list[torch.Tensor | None], k: int, mask: torch.Tensor) -> torch.Tensor:
    value = per_pos[k] if len(per_pos) > k else None
    return (value if value is not None else torch.zeros_like(mask, dtype=torch.float32))[None]


def scatter_packed(parts: Sequence[tuple[PackedMicroBatch, torch.Tensor]], out: torch.Tensor) -> torch.Tensor:
    """Write per-position values [1, T] of packed micro-batches into `out` [N, S-1] at (row, column)."""
    for mb, values in parts:
        keep = (mb.rows >= 0) & (mb.cols >= 0)
        out[mb.rows[keep], mb.cols[keep]] = values[0, keep].to(out.dtype)
    return out
