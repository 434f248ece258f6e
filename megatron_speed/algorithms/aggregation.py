"""How per-token losses become one optimizer step's scalar, as a (numerator, denominator) pair.

Normalisation invariant: an optimizer step's batch is split into micro-batches and spread over
data-parallel ranks. Each micro-batch returns `(numerator, denominator)`; the step's loss is

    Σ numerators / Σ denominators      (sums over ALL micro-batches and data-parallel ranks)

The actor hands the numerator to megatron-core's schedule as the loss and the denominator as
`num_tokens` with `calculate_per_token_loss=True`; megatron sums the denominators globally and
divides the gradients by that sum. Every numerator is a sum of per-row terms and every denominator
a count of rows or tokens, so the result is independent of how rows are split. (verl instead
normalises per micro-batch and divides by the number of accumulation steps, which is only an
approximation when micro-batches differ.) Denominators are integer counts, `torch.int` like
megatron's accumulator, on the mask's device.

Modes (`horizon` is the constant maximum response length, rollout.max_new_tokens):

| name                      | numerator                       | denominator       |
|---------------------------|---------------------------------|-------------------|
| `token-mean`              | Σ masked token losses           | # masked tokens   |
| `seq-mean-token-mean`     | Σ_seq (mean over its tokens)    | # sequences       |
| `seq-mean-token-sum`      | Σ_seq Σ_t                       | # sequences       |
| `seq-mean-token-sum-norm` | Σ_seq Σ_t / horizon  (Dr.GRPO)  | # sequences       |

Rows whose mask is empty (padding rows) are excluded from the sequence count, as in current verl:
they contribute 0 to both numerator and denominator, so padding a micro-batch changes nothing.
Off-mask positions are selected away (never multiplied), so NaN or inf there cannot leak.
`seq-mean-token-sum-norm` divides by the number of sequences as well as by `horizon`; verl divides
the token sum by the padded length only. With a fixed number of sequences per step the two differ
by a constant factor (a learning-rate scale).

A step whose denominators sum to 0 (no response token at all) has numerator 0 too; the caller must
skip it or clamp the denominator at 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Aggregation = Callable[..., tuple[Tensor, Tensor]]


def _masked(per_token_loss: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(loss with off-mask positions set to 0, boolean mask), after checking both are [B, T]."""
    if per_token_loss.dim() != 2 or per_token_loss.shape != mask.shape:
        raise ValueError(f"expected per_token_loss and mask of one shape [B, T], got "
                         f"{tuple(per_token_loss.shape)} and {tuple(mask.shape)}")
    on = mask > 0
    return torch.where(on, per_token_loss, torch.zeros_like(per_token_loss)), on


def _count(on: Tensor) -> Tensor:
    return on.sum().to(torch.int)


def token_mean(per_token_loss: Tensor, mask: Tensor, *, horizon: int = 1) -> tuple[Tensor, Tensor]:
    """(Σ masked token losses, # masked tokens): the mean over every response token of the step."""
    loss, on = _masked(per_token_loss, mask)
    return loss.sum(), _count(on)


def seq_mean_token_mean(per_token_loss: Tensor, mask: Tensor, *, horizon: int = 1) -> tuple[Tensor, Tensor]:
    """(Σ_seq mean of its token losses, # non-empty sequences): every sequence weighs the same."""
    loss, on = _masked(per_token_loss, mask)
    tokens = on.sum(-1)
    per_seq = loss.sum(-1) / tokens.clamp(min=1).to(loss.dtype)
    return per_seq.sum(), _count(tokens > 0)


def seq_mean_token_sum(per_token_loss: Tensor, mask: Tensor, *, horizon: int = 1) -> tuple[Tensor, Tensor]:
    """(Σ_seq Σ_t token losses, # non-empty sequences): long sequences weigh more."""
    loss, on = _masked(per_token_loss, mask)
    return loss.sum(), _count(on.any(-1))


def seq_mean_token_sum_norm(per_token_loss: Tensor, mask: Tensor, *, horizon: int) -> tuple[Tensor, Tensor]:
    """(Σ_seq Σ_t token losses / horizon, # non-empty sequences): Dr.GRPO's constant normaliser."""
    if horizon < 1:
        raise ValueError(f"horizon (the maximum response length) must be >= 1, got {horizon}")
    loss, on = _masked(per_token_loss, mask)
    return loss.sum() / horizon, _count(on.any(-1))


# Name -> `f(per_token_loss [B, T], mask [B, T], *, horizon) -> (numerator, denominator)`.
LOSS_AGGREGATIONS: dict[str, Aggregation] = {
    "token-mean": token_mean,
    "seq-mean-token-mean": seq_mean_token_mean,
    "seq-mean-token-sum": seq_mean_token_sum,
    "seq-mean-token-sum-norm": seq_mean_token_sum_norm,
}


def aggregate_loss(per_token_loss: Tensor, mask: Tensor, *, aggregation: str,
                   horizon: int = 1) -> tuple[Tensor, Tensor]:
    """Look `aggregation` up in `LOSS_AGGREGATIONS` and apply it; ValueError names the known modes."""
    if aggregation not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {aggregation!r}; known: {sorted(LOSS_AGGREGATIONS)}")
    return LOSS_AGGREGATIONS[aggregation](per_token_loss, mask, horizon=horizon)


def aggregate_segments(per_token_loss: Tensor, mask: Tensor, segment: Tensor, *, segment_tokens: Tensor,
                       segment_counted: Tensor, aggregation: str, horizon: int = 1) -> tuple[Tensor, Tensor]:
    """The same (numerator, denominator) as `aggregate_loss` for sequences packed in one row.

    per_token_loss, mask: [1, T] (or [T]); segment [T]: each position's sequence; segment_tokens [n]:
    the masked tokens of each WHOLE sequence (which context parallelism may spread over ranks);
    segment_counted [n]: whether this holder counts the sequence in the denominator (exactly one
    holder per sequence does). Summed over the holders of every part of every sequence, numerators
    and denominators equal those of the padded layout, so the step's loss is the same number."""
    if aggregation not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {aggregation!r}; known: {sorted(LOSS_AGGREGATIONS)}")
    loss, on = _masked(per_token_loss.reshape(1, -1), mask.reshape(1, -1))
    loss, on = loss[0], on[0]
    if aggregation == "token-mean":
        return loss.sum(), _count(on)
    sequences = _count(segment_counted & (segment_tokens > 0))
    if aggregation == "seq-mean-token-mean":
        return (loss / segment_tokens[segment].clamp(min=1).to(loss.dtype)).sum(), sequences
    if aggregation == "seq-mean-token-sum-norm":
        if horizon < 1:
            raise ValueError(f"horizon (the maximum response length) must be >= 1, got {horizon}")
        return loss.sum() / horizon, sequences
    return loss.sum(), sequences


__all__ = ["LOSS_AGGREGATIONS", "aggregate_loss", "aggregate_segments", "seq_mean_token_mean", "seq_mean_token_sum",
           "seq_mean_token_sum_norm", "token_mean"]
