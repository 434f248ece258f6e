"""Advantage estimators and the PPO loss against hand-computed values and their invariants."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_speed.algorithms.advantages import ESTIMATORS, broadcast_to_tokens, rloo, segment_sum
from megatron_speed.algorithms.losses import LOSS_AGGREGATIONS, ppo_clip_loss, ppo_clip_token_loss


def offsets_of(sizes: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.long)


def rloo_reference(rewards: list[float], sizes: list[int]) -> list[float]:
    """The definition, one group at a time."""
    out, start = [], 0
    for k in sizes:
        group = rewards[start:start + k]
        for r in group:
            out.append(r if k == 1 else r - (sum(group) - r) / (k - 1))
        start += k
    return out


# ---------------------------------------------------------------- RLOO


def test_rloo_hand_computed_unequal_groups() -> None:
    # groups [1, 0, 1], [0, 0], [1]
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    adv = rloo(rewards, offsets_of([3, 2, 1]))
    # [1,0,1]: 1 - mean(0,1) = 0.5; 0 - mean(1,1) = -1; 1 - mean(1,0) = 0.5
    # [0,0]:   0 - 0 = 0 each
    # [1]:     size 1 -> A = r (verl's convention) = 1
    expected = torch.tensor([0.5, -1.0, 0.5, 0.0, 0.0, 1.0])
    torch.testing.assert_close(adv, expected)


def test_rloo_non_binary_rewards() -> None:
    rewards = torch.tensor([2.0, 4.0, 9.0, -1.0, 3.0])
    adv = rloo(rewards, offsets_of([3, 2]))
    expected = torch.tensor([2.0 - 6.5, 4.0 - 5.5, 9.0 - 3.0, -1.0 - 3.0, 3.0 + 1.0])
    torch.testing.assert_close(adv, expected)


def test_rloo_is_registered_and_keeps_dtype() -> None:
    assert ESTIMATORS["rloo"] is rloo
    rewards = torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert ESTIMATORS["rloo"](rewards, offsets_of([2])).dtype == torch.float64


def test_rloo_permuting_groups_permutes_outputs() -> None:
    groups = [[1.0, 0.0, 1.0], [0.0, 0.0], [1.0], [0.3, 0.9, 0.1, 0.5]]
    order = [2, 0, 3, 1]

    def run(gs: list[list[float]]) -> list[torch.Tensor]:
        sizes = [len(g) for g in gs]
        adv = rloo(torch.tensor([r for g in gs for r in g]), offsets_of(sizes))
        return list(torch.split(adv, sizes))

    base = run(groups)
    permuted = run([groups[i] for i in order])
    for position, i in enumerate(order):
        torch.testing.assert_close(permuted[position], base[i])


def test_rloo_empty_groups_are_allowed() -> None:
    adv = rloo(torch.tensor([1.0, 0.0]), torch.tensor([0, 0, 2, 2]))
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0]))


@pytest.mark.parametrize("offsets", [[1, 3], [0, 2], [0, 3, 2, 3]])
def test_rloo_rejects_bad_offsets(offsets: list[int]) -> None:
    with pytest.raises(ValueError, match="group_offsets"):
        rloo(torch.zeros(3), torch.tensor(offsets))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=6), min_size=1, max_size=8))
def test_rloo_matches_definition_and_centres_groups(groups: list[list[float]]) -> None:
    sizes = [len(g) for g in groups]
    flat = [r for g in groups for r in g]
    adv = rloo(torch.tensor(flat, dtype=torch.float64), offsets_of(sizes))
    torch.testing.assert_close(adv, torch.tensor(rloo_reference(flat, sizes), dtype=torch.float64))
    # Leave-one-out advantages of a group with 2+ samples sum to zero.
    for size, group_adv in zip(sizes, torch.split(adv, sizes), strict=True):
        if size > 1:
            assert abs(float(group_adv.sum())) < 1e-9


def test_segment_sum() -> None:
    sums = segment_sum(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 1, 1, 4]))
    torch.testing.assert_close(sums, torch.tensor([1.0, 0.0, 9.0]))


def test_broadcast_to_tokens() -> None:
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    out = broadcast_to_tokens(torch.tensor([0.5, -2.0]), mask)
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.5, 0.0], [0.0, -2.0, -2.0]]))


# ---------------------------------------------------------------- PPO clip loss

# One row of six tokens, clip 0.2 / 0.28 (range [0.8, 1.28]):
#   A   rho   -A*rho  -A*clip(rho)  loss   clipped branch active?
#   1   1.1   -1.1    -1.1          -1.1   no (inside the range)
#   1   1.5   -1.5    -1.28         -1.28  yes
#  -1   1.5    1.5     1.28          1.5   no
#  -2   0.5    1.0     1.6           1.6   yes
#   2   0.5   -1.0    -1.6          -1.0   no
#  -1   1.0    1.0     1.0           1.0   no
RATIOS = [1.1, 1.5, 1.5, 0.5, 0.5, 1.0]
ADVANTAGES = [1.0, 1.0, -1.0, -2.0, 2.0, -1.0]
LOSSES = [-1.1, -1.28, 1.5, 1.6, -1.0, 1.0]
# d loss / d logprob = -A*rho where the unclipped branch is active, else 0.
GRADS = [-1.1, 0.0, 1.5, 0.0, -1.0, 1.0]


def hand_example(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.5, -0.7]], dtype=dtype)
    logprobs = (old + torch.log(torch.tensor([RATIOS], dtype=dtype))).requires_grad_(True)
    return logprobs, old, torch.tensor([ADVANTAGES], dtype=dtype), torch.ones(1, 6, dtype=dtype)


def test_ppo_clip_loss_hand_computed() -> None:
    logprobs, old, adv, mask = hand_example()
    per_token, _ = ppo_clip_token_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.28)
    torch.testing.assert_close(per_token.detach(), torch.tensor([LOSSES], dtype=torch.float64))
    loss, tokens, stats = ppo_clip_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.28)
    torch.testing.assert_close(loss, torch.tensor(sum(LOSSES), dtype=torch.float64))  # token-mean numerator
    assert int(tokens) == 6
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([GRADS], dtype=torch.float64))
    assert float(stats["clipped_tokens"]) == 2
    assert float(stats["tokens"]) == 6
    assert math.isclose(float(stats["ratio_sum"]), sum(RATIOS))
    k3 = sum(r - 1 - math.log(r) for r in RATIOS)
    assert math.isclose(float(stats["approx_kl_sum"]), k3, rel_tol=1e-9)
    assert all(not v.requires_grad for v in stats.values())


def test_ppo_clip_loss_ignores_masked_tokens_even_with_garbage_logprobs() -> None:
    logprobs, old, adv, _ = hand_example()
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0, 1.0]])
    # Off-mask log-probs that would overflow exp() if they were not masked out first.
    garbage_lp = logprobs.detach().clone()
    garbage_lp[0, 1], garbage_lp[0, 4] = 1e4, -1e4
    garbage_lp.requires_grad_(True)
    garbage_adv = adv.clone()
    garbage_adv[0, 1] = float("nan")
    loss, tokens, stats = ppo_clip_loss(garbage_lp, old, garbage_adv, mask, clip_low=0.2, clip_high=0.28)
    assert int(tokens) == 4
    expected = sum(loss_t for loss_t, m in zip(LOSSES, mask[0].tolist(), strict=True) if m)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))
    loss.backward()
    assert torch.isfinite(garbage_lp.grad).all()
    assert float(garbage_lp.grad[0, 1]) == 0.0 and float(garbage_lp.grad[0, 4]) == 0.0
    assert float(stats["tokens"]) == 4 and float(stats["clipped_tokens"]) == 1
    assert all(torch.isfinite(v) for v in stats.values())


def random_batch(seed: int, batch: int = 6, length: int = 7) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=g, dtype=torch.float64) * 3
    logprobs = old + torch.randn(batch, length, generator=g, dtype=torch.float64) * 0.3
    adv = broadcast_to_tokens(torch.randn(batch, generator=g, dtype=torch.float64),
                              torch.ones(batch, length, dtype=torch.float64))
    mask = (torch.rand(batch, length, generator=g) > 0.35).double()
    mask[0] = 0.0  # an all-padding row
    return logprobs, old, adv, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_micro_batch_sums_over_global_count_equal_token_mean(seed: int) -> None:
    logprobs, old, adv, mask = random_batch(seed)
    aggregate = LOSS_AGGREGATIONS["token-mean"]

    whole_lp = logprobs.clone().requires_grad_(True)
    per_token, _ = ppo_clip_token_loss(whole_lp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    numerator, denominator = aggregate(per_token, mask, horizon=1)
    assert int(denominator) == int(mask.sum())
    whole = numerator / denominator
    torch.testing.assert_close(whole, (per_token * mask).sum() / mask.sum())  # the token-mean
    whole.backward()

    # megatron-core sums the denominators of every micro-batch, then scales the summed gradients.
    split_lp = logprobs.clone().requires_grad_(True)
    parts = [ppo_clip_loss(split_lp[rows], old[rows], adv[rows], mask[rows], clip_low=0.2, clip_high=0.28)
             for rows in (slice(0, 2), slice(2, 6))]  # unequal micro-batches, unequal token counts
    global_tokens = sum(int(den) for _, den, _ in parts)
    for num, _, _ in parts:
        (num / global_tokens).backward()
    total = sum(num.detach() for num, _, _ in parts) / global_tokens
    torch.testing.assert_close(total, whole.detach())
    torch.testing.assert_close(split_lp.grad, whole_lp.grad)


def test_stats_add_up_over_micro_batches() -> None:
    logprobs, old, adv, mask = random_batch(3)
    _, _, whole = ppo_clip_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.2, clip_c=1.5)
    _, _, a = ppo_clip_loss(logprobs[:3], old[:3], adv[:3], mask[:3], clip_low=0.2, clip_high=0.2, clip_c=1.5)
    _, _, b = ppo_clip_loss(logprobs[3:], old[3:], adv[3:], mask[3:], clip_low=0.2, clip_high=0.2, clip_c=1.5)
    for key, value in whole.items():
        torch.testing.assert_close(a[key] + b[key], value)


def test_token_mean_with_no_tokens_is_zero_over_zero() -> None:
    numerator, denominator = LOSS_AGGREGATIONS["token-mean"](torch.zeros(2, 3), torch.zeros(2, 3), horizon=1)
    assert float(numerator) == 0.0 and int(denominator) == 0 and denominator.dtype == torch.int


def test_ppo_clip_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        ppo_clip_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3),
                      clip_low=0.2, clip_high=0.2)
