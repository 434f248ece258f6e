"""Token log-probs from (possibly vocab-parallel) logits, without gathering the full vocabulary.

`megatron.core.tensor_parallel.vocab_parallel_cross_entropy` reduces the max and the normaliser
across the tensor-parallel group, so each rank keeps only its vocabulary shard; with TP=1 it is an
ordinary cross entropy. Log-probs are taken at the sampling temperature, matching vLLM's
processed log-probs.
"""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """logits [B, S, V/tp] for positions 0..S-1, tokens [B, S] -> log p(tokens[:, t+1]) as [B, S-1]."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    shifted = logits[:, :-1].float()
    if temperature != 1.0:
        shifted = shifted / temperature
    shifted = shifted.contiguous()
    if shifted.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr():
        # megatron's cross entropy subtracts the max and exponentiates IN PLACE. With float32 logits,
        # temperature 1.0 and one row, `logits[:, :-1]` is already contiguous, so `shifted` would be a
        # view of the model's logits and the entropy (and its gradient) would read exp(logits - max).
        shifted = shifted.clone()
    targets = tokens[:, 1:].contiguous()
    # vocab_parallel_cross_entropy works on [S, B, V] in megatron; the op is elementwise over the
    # leading dims, so the [B, S, V] layout is equally valid.
    return -vocab_parallel_cross_entropy(shifted, targets)


def position_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """logits [B, T, V/tp], labels [B, T] (the token after each position) -> log p(labels) as [B, T].

    The packed layout's variant of `token_logprobs`: labels are already aligned, nothing is shifted.
    The division always makes a new tensor, so megatron's in-place cross entropy never writes
    into `logits` (which the entropy term may still read)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return -vocab_parallel_cross_entropy(logits.float() / temperature, labels.contiguous())


def token_entropy(logits: torch.Tensor, *, temperature: float = 1.0, shift: bool = True) -> torch.Tensor:
    """Entropy [B, S-1] of the next-token distribution from vocab-parallel logits [B, S, V/tp]
    (`shift=False`: at every position, [B, S], for position-aligned packed rows).

    H = log Z - sum_v p_v * (l_v - m): the max m is reduced without gradient (a constant shift), the
    normaliser and the expectation are summed across the tensor-parallel group with megatron's
    autograd-aware reduction, so no rank materialises the full vocabulary.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    scaled = (logits[:, :-1] if shift else logits).float() / temperature
    shift = scaled.detach().max(dim=-1, keepdim=True).values
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1:
        torch.distributed.all_reduce(shift, op=torch.distributed.ReduceOp.MAX,
                                     group=parallel_state.get_tensor_model_parallel_group())
    centred = scaled - shift
    exp = centred.exp()
    partition = exp.sum(dim=-1)
    weighted = (exp * centred).sum(dim=-1)
    if tp > 1:
        partition = reduce_from_tensor_model_parallel_region(partition)
        weighted = reduce_from_tensor_model_parallel_region(weighted)
    return partition.log() - weighted / partition
