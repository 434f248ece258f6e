"""Assemble scored groups into the padded `TrainBatch` the actor consumes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_speed.records import RolloutGroup, TrainBatch


def build_train_batch(groups: Sequence[RolloutGroup], *, pad_id: int) -> TrainBatch:
    """Right-pad prompt+response rows to one length, keeping each group's rows contiguous.

    Masks are aligned with next-token log-probs: position t covers token t+1. A group must carry
    one reward per completion (scored before it reaches here).
    """
    rows: list[tuple[list[int], int, tuple[float, ...]]] = []
    rewards: list[float] = []
    versions: list[int] = []
    offsets = [0]
    for g in groups:
        if len(g.rewards) != len(g.completions):
            raise ValueError(f"group {g.prompt.uid} has {len(g.completions)} completions but "
                             f"{len(g.rewards)} rewards")
        for c, r in zip(g.completions, g.rewards):
            rows.append((list(g.prompt_token_ids) + list(c.token_ids), len(g.prompt_token_ids), c.logprobs))
            rewards.append(r)
            versions.append(c.policy_version)
        offsets.append(len(rows))
    width = max(len(ids) for ids, _, _ in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width - 1)
    engine_logprobs = torch.zeros(len(rows), width - 1)
    for i, (ids, prompt_len, logprobs) in enumerate(rows):
        tokens[i, :len(ids)] = torch.tensor(ids)
        mask[i, prompt_len - 1:len(ids) - 1] = 1.0
        engine_logprobs[i, prompt_len - 1:len(ids) - 1] = torch.tensor(logprobs)
    return TrainBatch(tokens=tokens, response_mask=mask, rollout_logprobs=engine_logprobs,
                      rewards=torch.tensor(rewards), group_offsets=torch.tensor(offsets),
                      uids=[g.prompt.uid for g in groups], versions=torch.tensor(versions, dtype=torch.long))
