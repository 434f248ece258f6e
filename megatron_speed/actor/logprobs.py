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
    targets = tokens[:, 1:].contiguous()
    # vocab_parallel_cross_entropy works on [S, B, V] in megatron; the op is elementwise over the
    # leading dims, so the [B, S, V] layout is equally valid.
    return -vocab_parallel_cross_entropy(shifted.contiguous(), targets)
