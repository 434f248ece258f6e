"""Cut one rank's rows into micro-batches: fixed row counts, or a token budget (dynamic batching).

Fixed (`optim.micro_batch_tokens == 0`): contiguous micro-batches of `optim.micro_batch_size` rows at
the batch's full padded length, as before.

Dynamic (`micro_batch_tokens > 0`): rows are sorted longest first and packed greedily so that
rows x padded length <= budget, and each micro-batch is trimmed to its longest row. Rows are right
padded and the model is causal, so dropping trailing padding changes no log-prob that a kept position
depends on; the loss stays an exact token mean because it returns (sum, count) per micro-batch and
megatron divides by the count summed over all micro-batches and ranks. A row longer than the budget
gets a micro-batch of its own (a row cannot be split).

A row's length is what its loss needs: tokens up to and including the last response token. Without
a mask (plain log-prob requests) every row keeps the full length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MicroBatch:
    tokens: torch.Tensor  # [b, L]
    mask: torch.Tensor  # [b, L-1]
    old_logprobs: torch.Tensor  # [b, L-1]
    advantages: torch.Tensor  # [b, L-1]
    ref_logprobs: torch.Tensor | None = None  # [b, L-1], only with a KL penalty
    rows: torch.Tensor | None = None  # indices of these rows in the rank's rows (None: contiguous order)


def row_lengths(mask: torch.Tensor | None, width: int, rows: int) -> list[int]:
    """Tokens each row needs: through its last masked next-token position (mask position t = token t+1)."""
    if mask is None:
        return [width] * rows
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, positions, torch.zeros_like(positions)).max(dim=1).values
    return [max(v + 1, 2) for v in last.tolist()]  # one device-to-host copy, not one sync per row


def plan(lengths: Sequence[int], *, rows_per_micro_batch: int, token_budget: int,
         min_micro_batches: int = 1) -> list[list[int]]:
    """Row indices of each micro-batch. `min_micro_batches` (the interleaved pipeline needs at least PP
    micro-batches) is met by halving the largest micro-batch until there are enough."""
    n = len(lengths)
    if token_budget <= 0:
        groups = [list(range(i, min(i + rows_per_micro_batch, n))) for i in range(0, n, rows_per_micro_batch)]
    else:
        groups, current, longest = [], [], 0
        for i in sorted(range(n), key=lambda r: -lengths[r]):  # stable: ties keep their order
            if current and (len(current) + 1) * max(longest, lengths[i]) > token_budget:
                groups.append(current)
                current, longest = [], 0
            current.append(i)
            longest = max(longest, lengths[i])
        groups.append(current)
    while len(groups) < min_micro_batches:
        big = max(range(len(groups)), key=lambda g: len(groups[g]))
        if len(groups[big]) < 2:
            raise ValueError(f"{n} rows cannot form the {min_micro_batches} micro-batches the interleaved "
                             "pipeline schedule needs; give each data-parallel rank more rows")
        half = len(groups[big]) // 2
        groups[big:big + 1] = [groups[big][:half], groups[big][half:]]
    return groups


def cut(groups: list[list[int]], lengths: Sequence[int], tokens: torch.Tensor,
        *per_token: torch.Tensor | None, trim: bool) -> list[MicroBatch]:
    """Materialise planned micro-batches; with `trim`, each is cut to its longest row."""
    out = []
    for group in groups:
        idx = torch.tensor(group, dtype=torch.long, device=tokens.device)
        width = max(lengths[i] for i in group) if trim else tokens.shape[1]
        parts = (t[idx, :width - 1] if t is not None else None for t in per_token)
        out.append(MicroBatch(tokens[idx, :width], *parts, rows=idx))
    return out


def pad_to_common_shape(micro_batches: list[MicroBatch]) -> list[MicroBatch]:
    """Pad every micro-batch to the largest rows x length among them (interleaved pipelines on gloo
    need fixed activation shapes). Padding rows have an empty mask, so they add nothing to any loss
    numerator or denominator, and row index -1, so their log-probs are dropped."""
    rows = max(mb.tokens.shape[0] for mb in micro_batches)
    width = max(mb.tokens.shape[1] for mb in micro_batches)

    def pad(t: torch.Tensor | None, cols: int) -> torch.Tensor | None:
        return None if t is None else torch.nn.functional.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))

    out = []
    for mb in micro_batches:
        index = mb.rows if mb.rows is not None else torch.arange(mb.tokens.shape[0], device=mb.tokens.device)
        out.append(MicroBatch(pad(mb.tokens, width), pad(mb.mask, width - 1), pad(mb.old_logprobs, width - 1),
                              pad(mb.advantages, width - 1), pad(mb.ref_logprobs, width - 1),
                              rows=torch.cat([index, index.new_full((rows - len(index),), -1)])))
    return out


def split_rows(size: int, tokens: torch.Tensor, *per_token: torch.Tensor | None) -> list[MicroBatch]:
    """Contiguous micro-batches of `size` rows at full length (the fixed-size path)."""
    n = tokens.shape[0]
    groups = plan([tokens.shape[1]] * n, rows_per_micro_batch=size, token_budget=0)
    return cut(groups, [tokens.shape[1]] * n, tokens, *per_token, trim=False)


def scatter_rows(parts: Sequence[tuple[torch.Tensor, torch.Tensor]], zeros: torch.Tensor) -> torch.Tensor:
    """Put per-micro-batch results [b, L-1] back at their rows of a copy of `zeros` [rows, width]
    (float32 on the batch's device; stages without outputs return it as is)."""
    out = zeros.clone()
    for idx, values in parts:
        real = idx >= 0  # -1 marks padding rows
        out[idx[real], :values.shape[1]] = values[real]
    return out
