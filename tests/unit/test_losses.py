"""Dual-clip PPO, loss aggregations over micro-batches, KL / entropy terms and overlong shaping."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_speed.algorithms.aggregation import LOSS_AGGREGATIONS, aggregate_loss
from megatron_speed.algorithms.losses import kl_penalty, policy_objective, ppo_clip_loss, ppo_clip_token_loss
from megatron_speed.algorithms.shaping import overlong_penalty

F64 = torch.float64

# ---------------------------------------------------------------- dual-clip

# clip 0.2 / 0.28 (range [0.8, 1.28]), dual-clip c = 3:
#   A   rho  -A*rho  -A*clip(rho)  max    cap -A*c  loss  d loss/d logp
#  -1   5     5       1.28         5      3         3     0      (dual-clipped)
#  -1   2     2       1.28         2      3         2     2      (= -A*rho)
#  -1   0.5   0.5     0.8          0.8    3         0.8   0      (clipped)
#   1   5    -5      -1.28        -1.28   -         -1.28 0      (clipped; A > 0: no cap)
#  -2   4     8       2.56         8      6         6     0      (dual-clipped)
#   2   0.5  -1      -1.6         -1      -         -1   -1
DUAL_RATIOS = [5.0, 2.0, 0.5, 5.0, 4.0, 0.5]
DUAL_ADV = [-1.0, -1.0, -1.0, 1.0, -2.0, 2.0]
DUAL_LOSSES = [3.0, 2.0, 0.8, -1.28, 6.0, -1.0]
DUAL_GRADS = [0.0, 2.0, 0.0, 0.0, 0.0, -1.0]
NO_DUAL_LOSSES = [5.0, 2.0, 0.8, -1.28, 8.0, -1.0]


def dual_example() -> tuple[torch.Tensor, ...]:
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.5, -0.7]], dtype=F64)
    logprobs = (old + torch.log(torch.tensor([DUAL_RATIOS], dtype=F64))).requires_grad_(True)
    return logprobs, old, torch.tensor([DUAL_ADV], dtype=F64), torch.ones(1, 6, dtype=F64)


def test_dual_clip_hand_computed() -> None:
    logprobs, old, adv, mask = dual_example()
    per_token, stats = ppo_clip_token_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.28, clip_c=3.0)
    torch.testing.assert_close(per_token.detach(), torch.tensor([DUAL_LOSSES], dtype=F64))
    per_token.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([DUAL_GRADS], dtype=F64))
    assert float(stats["dual_clipped_tokens"]) == 2 and float(stats["clipped_tokens"]) == 2

    plain, plain_stats = ppo_clip_token_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.28)
    torch.testing.assert_close(plain.detach(), torch.tensor([NO_DUAL_LOSSES], dtype=F64))
    assert float(plain_stats["dual_clipped_tokens"]) == 0


def test_dual_clip_ignores_masked_tokens() -> None:
    logprobs, old, adv, _ = dual_example()
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    numerator, denominator, stats = ppo_clip_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.28,
                                                  clip_c=3.0)
    assert float(numerator.detach()) == pytest.approx(sum(DUAL_LOSSES[1:])) and int(denominator) == 5
    assert float(stats["dual_clipped_tokens"]) == 1


@pytest.mark.parametrize("clip_c", [1.0, 0.5])
def test_dual_clip_requires_c_above_one(clip_c: float) -> None:
    logprobs, old, adv, mask = dual_example()
    with pytest.raises(ValueError, match="clip_c"):
        ppo_clip_token_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.2, clip_c=clip_c)


# ---------------------------------------------------------------- aggregations

NAN = float("nan")
# Rows: tokens (1, 2, 3); (4); empty; (2, 6). Off-mask entries are garbage (NaN, inf) on purpose.
AGG_LOSS = torch.tensor([[1.0, 2.0, 3.0, NAN], [4.0, NAN, math.inf, 0.0], [NAN, 5.0, 5.0, 5.0],
                         [2.0, 6.0, -math.inf, 1.0]], dtype=F64)
AGG_MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]])
AGG_EXPECTED = {  # horizon 8 (not the padded length 4); the empty row counts in no denominator
    "token-mean": (18.0, 6),
    "seq-mean-token-mean": (2.0 + 4.0 + 4.0, 3),
    "seq-mean-token-sum": (6.0 + 4.0 + 8.0, 3),
    "seq-mean-token-sum-norm": ((6.0 + 4.0 + 8.0) / 8, 3),
}


@pytest.mark.parametrize("name", sorted(LOSS_AGGREGATIONS))
def test_aggregation_hand_computed(name: str) -> None:
    assert set(LOSS_AGGREGATIONS) == set(AGG_EXPECTED)
    numerator, denominator = aggregate_loss(AGG_LOSS, AGG_MASK, aggregation=name, horizon=8)
    expected_num, expected_den = AGG_EXPECTED[name]
    assert float(numerator) == pytest.approx(expected_num)
    assert int(denominator) == expected_den and denominator.dtype == torch.int
    # Padding rows change nothing.
    padded_loss = torch.cat([AGG_LOSS, torch.full((2, 4), NAN, dtype=F64)])
    padded = aggregate_loss(padded_loss, torch.cat([AGG_MASK, torch.zeros(2, 4, dtype=AGG_MASK.dtype)]),
                            aggregation=name, horizon=8)
    assert float(padded[0]) == pytest.approx(expected_num) and int(padded[1]) == expected_den


def test_aggregation_errors() -> None:
    with pytest.raises(ValueError, match="known"):
        aggregate_loss(AGG_LOSS, AGG_MASK, aggregation="seq-mean", horizon=4)
    with pytest.raises(ValueError, match="horizon"):
        aggregate_loss(AGG_LOSS, AGG_MASK, aggregation="seq-mean-token-sum-norm", horizon=0)
    with pytest.raises(ValueError, match="shape"):
        aggregate_loss(AGG_LOSS, AGG_MASK[:, :3], aggregation="token-mean")


def random_batch(seed: int, batch: int = 7, length: int = 9) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=g, dtype=F64) * 3
    logprobs = old + torch.randn(batch, length, generator=g, dtype=F64) * 0.6
    adv = torch.randn(batch, 1, generator=g, dtype=F64).expand(batch, length).clone()
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).double()
    mask[2] = 0.0  # an all-padding row
    return logprobs, old, adv, mask


def direct_value(name: str, per_token: torch.Tensor, mask: torch.Tensor, horizon: int) -> torch.Tensor:
    """Each mode written from its definition on the whole batch."""
    rows = mask.sum(-1) > 0
    sums, counts = (per_token * mask).sum(-1)[rows], mask.sum(-1)[rows]
    return {"token-mean": sums.sum() / counts.sum(), "seq-mean-token-mean": (sums / counts).mean(),
            "seq-mean-token-sum": sums.mean(), "seq-mean-token-sum-norm": (sums / horizon).mean()}[name]


@pytest.mark.parametrize("name", sorted(LOSS_AGGREGATIONS))
@pytest.mark.parametrize("seed", [0, 1])
def test_micro_batches_give_the_whole_batch_value_and_gradient(name: str, seed: int) -> None:
    logprobs, old, adv, mask = random_batch(seed)
    options = {"clip_low": 0.2, "clip_high": 0.28, "clip_c": 3.0, "aggregation": name, "horizon": 12}

    whole_lp = logprobs.clone().requires_grad_(True)
    numerator, denominator, _ = ppo_clip_loss(whole_lp, old, adv, mask, **options)
    whole = numerator / denominator
    per_token, _ = ppo_clip_token_loss(whole_lp, old, adv, mask, clip_low=0.2, clip_high=0.28, clip_c=3.0)
    torch.testing.assert_close(whole, direct_value(name, per_token, mask, 12))
    whole.backward()

    split_lp = logprobs.clone().requires_grad_(True)
    parts = [ppo_clip_loss(split_lp[rows], old[rows], adv[rows], mask[rows], **options)
             for rows in (slice(0, 1), slice(1, 5), slice(5, 7))]  # uneven rows and token counts
    global_denominator = sum(int(den) for _, den, _ in parts)  # what megatron-core sums
    for num, _, _ in parts:
        (num / global_denominator).backward()
    total = sum(num.detach() for num, _, _ in parts) / global_denominator
    torch.testing.assert_close(total, whole.detach())
    torch.testing.assert_close(split_lp.grad, whole_lp.grad)
    assert float(whole_lp.grad.abs().sum()) > 0


@pytest.mark.parametrize("name", ["token-mean", "seq-mean-token-mean"])
def test_full_objective_splits_over_micro_batches(name: str) -> None:
    logprobs, old, adv, mask = random_batch(5)
    ref = old + 0.3
    entropy = torch.rand(old.shape, generator=torch.Generator().manual_seed(1), dtype=F64)

    def micro(lp: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        pg, _ = ppo_clip_token_loss(lp[rows], old[rows], adv[rows], mask[rows], clip_low=0.2, clip_high=0.2)
        kl = kl_penalty(lp[rows], ref[rows], mask[rows], "k3")
        total = policy_objective(pg, kl=kl, kl_coef=0.1, entropy=entropy[rows], entropy_coef=0.01)
        return aggregate_loss(total, mask[rows], aggregation=name)

    whole_lp = logprobs.clone().requires_grad_(True)
    num, den = micro(whole_lp, slice(0, 7))
    (num / den).backward()
    split_lp = logprobs.clone().requires_grad_(True)
    parts = [micro(split_lp, rows) for rows in (slice(0, 3), slice(3, 7))]
    global_den = sum(int(d) for _, d in parts)
    for n, _ in parts:
        (n / global_den).backward()
    torch.testing.assert_close(sum(n.detach() for n, _ in parts) / global_den, (num / den).detach())
    torch.testing.assert_close(split_lp.grad, whole_lp.grad)


# ---------------------------------------------------------------- KL, entropy, objective


def test_kl_penalty_values() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -0.3, 50.0]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.0, -0.3, -50.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0]])
    k1 = kl_penalty(logprobs, ref, mask, "k1")
    torch.testing.assert_close(k1, torch.tensor([[0.5, -1.0, 0.0, 0.0]], dtype=F64))
    k3 = kl_penalty(logprobs, ref, mask, "k3")  # exp(ref-logp) - (ref-logp) - 1
    expected = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1, 0.0, 0.0]
    torch.testing.assert_close(k3, torch.tensor([expected], dtype=F64))
    with pytest.raises(ValueError, match="k2"):
        kl_penalty(logprobs, ref, mask, "k2")  # type: ignore[arg-type]


def test_k3_is_non_negative_with_zero_gradient_at_the_reference() -> None:
    g = torch.Generator().manual_seed(0)
    logprobs = (-torch.rand(4, 6, generator=g, dtype=F64) * 5).requires_grad_(True)
    ref = logprobs.detach() + torch.randn(4, 6, generator=g, dtype=F64) * 3
    assert bool((kl_penalty(logprobs, ref, torch.ones(4, 6), "k3") >= 0).all())
    at_ref = kl_penalty(logprobs, logprobs.detach(), torch.ones(4, 6), "k3")
    at_ref.sum().backward()
    assert float(at_ref.detach().abs().max()) == 0.0 and float(logprobs.grad.abs().max()) == 0.0


def test_policy_objective() -> None:
    pg = torch.tensor([[1.0, -2.0]])
    kl = torch.tensor([[0.5, 1.0]])
    entropy = torch.tensor([[2.0, 4.0]])
    out = policy_objective(pg, kl=kl, kl_coef=0.1, entropy=entropy, entropy_coef=0.01)
    torch.testing.assert_close(out, torch.tensor([[1.0 + 0.05 - 0.02, -2.0 + 0.1 - 0.04]]))
    assert policy_objective(pg) is pg
    with pytest.raises(ValueError, match="kl_coef"):
        policy_objective(pg, kl_coef=0.1)
    with pytest.raises(ValueError, match="entropy"):
        policy_objective(pg, entropy=entropy[:, :1], entropy_coef=0.1)


# ---------------------------------------------------------------- overlong shaping


def test_overlong_penalty_boundaries() -> None:
    # max 20, buffer 4: expected 16; 0 up to 16, then -1/4 per token, -factor at 20.
    lengths = torch.tensor([0, 10, 16, 17, 18, 20, 24])
    out = overlong_penalty(lengths, max_length=20, buffer_length=4, factor=1.0)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 0.0, -0.25, -0.5, -1.0, -2.0]))
    half = overlong_penalty(lengths.double(), max_length=20, buffer_length=4, factor=0.5)
    assert half.dtype == F64 and float(half[5]) == -0.5 and float(half[2]) == 0.0
    whole_buffer = overlong_penalty(torch.tensor([0, 5, 10]), max_length=10, buffer_length=10, factor=1.0)
    torch.testing.assert_close(whole_buffer, torch.tensor([0.0, -0.5, -1.0]))
    with pytest.raises(ValueError, match="buffer_length"):
        overlong_penalty(lengths, max_length=20, buffer_length=0, factor=1.0)
