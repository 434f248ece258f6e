"""The trainer's glue between the batch and the pure algorithms: shaping, estimator options, mismatch."""

from __future__ import annotations

import torch

from megatron_speed.algorithms import broadcast_to_tokens, js, overlong_penalty, rloo
from megatron_speed.config.schema import AlgorithmConfig
from megatron_speed.records import TrainBatch
from megatron_speed.trainer import _mismatch, compute_advantages


def _batch(rewards: list[float], lengths: list[int], offsets: list[int]) -> TrainBatch:
    width = max(lengths) + 2
    mask = torch.zeros(len(rewards), width - 1)
    for i, n in enumerate(lengths):
        mask[i, 1:1 + n] = 1.0
    return TrainBatch(tokens=torch.zeros(len(rewards), width, dtype=torch.long), response_mask=mask,
                      rollout_logprobs=torch.zeros_like(mask), rewards=torch.tensor(rewards),
                      group_offsets=torch.tensor(offsets), uids=[str(g) for g in range(len(offsets) - 1)])


def test_rloo_by_default_and_js_with_its_lambda() -> None:
    batch = _batch([1.0, 0.0, 1.0, 0.0, 0.0, 1.0], [3] * 6, [0, 3, 6])
    adv, stats = compute_advantages(batch, AlgorithmConfig(), horizon=8)
    mask = batch.response_mask
    assert torch.allclose(adv, broadcast_to_tokens(rloo(batch.rewards, batch.group_offsets), mask))
    adv, stats = compute_advantages(batch, AlgorithmConfig(advantage="js", js_lambda_variant="paper"), horizon=8)
    expected = js(batch.rewards, batch.group_offsets, lambda_variant="paper")
    assert torch.allclose(adv, broadcast_to_tokens(expected, mask), atol=1e-6)
    assert 0.0 <= stats["advantage/js_lambda_mean"] < 1.0


def test_overlong_penalty_is_added_before_the_estimator() -> None:
    batch = _batch([1.0, 1.0, 0.0, 1.0], [2, 8, 8, 3], [0, 2, 4])
    cfg = AlgorithmConfig(advantage="drgrpo", overlong_buffer_length=4)
    adv, stats = compute_advantages(batch, cfg, horizon=8)
    lengths = torch.tensor([2.0, 8.0, 8.0, 3.0])
    shaped = batch.rewards + overlong_penalty(lengths, max_length=8, buffer_length=4, factor=1.0)
    expected = torch.cat([shaped[:2] - shaped[:2].mean(), shaped[2:] - shaped[2:].mean()])
    assert torch.allclose(adv, broadcast_to_tokens(expected, batch.response_mask))
    assert stats["advantage/overlong_penalty_mean"] < 0


def test_mismatch_is_zero_for_identical_logprobs_and_positive_otherwise() -> None:
    lp = torch.randn(3, 5)
    mask = torch.ones(3, 5)
    assert _mismatch(lp, lp, mask)["mismatch/logprob_abs_diff"] == 0.0
    shifted = _mismatch(lp, lp + 0.1, mask)
    assert abs(shifted["mismatch/logprob_abs_diff"] - 0.1) < 1e-6 and shifted["mismatch/kl_k3"] > 0
