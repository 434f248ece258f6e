"""Off-policy corrections (algorithms/corrections.py): weights, loss and gradient against a hand
computation in plain Python floats, token by token."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_speed.algorithms.corrections import CORRECTIONS
from megatron_speed.algorithms.losses import ppo_clip_token_loss
from megatron_speed.config.base import ConfigError
from megatron_speed.config.schema import AlgorithmConfig

CAP, BETA, CLIP_LOW, CLIP_HIGH = 2.0, 1.5, 0.2, 0.28


def hand_weights(name: str, old: list[list[float]], rollout: list[list[float]],
                 mask: list[list[float]]) -> list[list[float]]:
    """The weight of every token, written out from the formulas in the module docstring."""
    out = []
    for o_row, r_row, m_row in zip(old, rollout, mask):
        rhos = [math.exp(o - r) for o, r, m in zip(o_row, r_row, m_row)]
        on = [m > 0 for m in m_row]
        logs = [o - r for o, r, m in zip(o_row, r_row, m_row) if m > 0]
        geo = math.exp(sum(logs) / max(len(logs), 1))
        row = []
        for rho, keep in zip(rhos, on):
            if not keep:
                row.append(0.0)
            elif name == "none":
                row.append(1.0)
            elif name == "tis":
                row.append(min(rho, CAP))
            elif name == "icepop":
                row.append(rho if 1 / BETA <= rho <= BETA else 0.0)
            elif name == "seq_mis":
                row.append(geo if 1 / BETA <= geo <= BETA else 0.0)
            elif name == "decoupled":
                row.append(rho if rho <= CAP else 0.0)
        out.append(row)
    return out


def hand_loss_and_grad(logp: list[list[float]], old: list[list[float]], adv: list[list[float]],
                       w: list[list[float]], mask: list[list[float]]) -> tuple[float, list[list[float]]]:
    """Token-mean of w * max(-A r, -A clip(r)); d/dlogp is -A w r where the unclipped branch is
    active (r inside the clip range, or outside with the unclipped term the larger), else 0."""
    n = sum(m > 0 for row in mask for m in row)
    total, grad = 0.0, []
    for lp_row, o_row, a_row, w_row, m_row in zip(logp, old, adv, w, mask):
        g_row = []
        for lp, o, a, wt, m in zip(lp_row, o_row, a_row, w_row, m_row):
            if m <= 0:
                g_row.append(0.0)
                continue
            r = math.exp(lp - o)
            unclipped, clipped = -a * r, -a * min(max(r, 1 - CLIP_LOW), 1 + CLIP_HIGH)
            total += wt * max(unclipped, clipped)
            g_row.append(-a * wt * r / n if unclipped >= clipped else 0.0)
        grad.append(g_row)
    return total / n, grad


def example() -> tuple[torch.Tensor, ...]:
    """(old, rollout, logp, adv, mask): rows 1 and 3 come from a behaviour policy that is off as a
    whole (a stale version), the others only token by token (engine-vs-actor noise)."""
    gen = torch.Generator().manual_seed(3)
    shape = (4, 7)
    old = torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.3 - 1.0
    rollout = old + torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.5
    rollout[1] += 0.6
    rollout[3] -= 0.6
    logp = old + torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.3
    adv = torch.randn(*shape, generator=gen, dtype=torch.float64)
    mask = (torch.rand(*shape, generator=gen) > 0.25).double()
    mask[:, 0] = 1.0
    return old, rollout, logp, adv, mask


@pytest.mark.parametrize("name", sorted(CORRECTIONS))
def test_each_correction_loss_and_gradient_by_hand(name: str) -> None:
    old, rollout, logp, adv, mask = example()
    logp.requires_grad_()

    weights, stats = CORRECTIONS[name](old, rollout, mask, cap=CAP, beta=BETA)
    expected_w = hand_weights(name, old.tolist(), rollout.tolist(), mask.tolist())
    assert torch.allclose(weights, torch.tensor(expected_w, dtype=torch.float64), atol=1e-12)
    assert not weights.requires_grad
    assert stats["tokens"].item() == mask.sum().item()
    assert stats["weight_sum"].item() == pytest.approx(sum(map(sum, expected_w)))

    per_token, _ = ppo_clip_token_loss(logp, old, adv * weights, mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH)
    loss = per_token.sum() / mask.sum()
    (grad,) = torch.autograd.grad(loss, logp)
    hand_loss, hand_grad = hand_loss_and_grad(logp.tolist(), old.tolist(), adv.tolist(), expected_w, mask.tolist())
    assert loss.item() == pytest.approx(hand_loss, rel=1e-10, abs=1e-12)
    assert torch.allclose(grad, torch.tensor(hand_grad, dtype=torch.float64), atol=1e-12)


def test_the_example_exercises_every_branch() -> None:
    """The random example above truncates (TIS), masks tokens (ICEPOP, decoupled) and whole responses
    (seq_mis) while keeping others, so the hand check covers both sides of every rule."""
    old, rollout, _, _, mask = example()
    kw = {"cap": CAP, "beta": BETA}
    assert CORRECTIONS["tis"](old, rollout, mask, **kw)[1]["truncated_tokens"] > 0
    for name in ("icepop", "decoupled"):
        w, s = CORRECTIONS[name](old, rollout, mask, **kw)
        assert 0 < s["masked_tokens"] < s["tokens"], name
    w, _ = CORRECTIONS["seq_mis"](old, rollout, mask, **kw)
    rows_kept = [(w[i][mask[i] > 0] > 0).all().item() for i in range(4)]
    rows_dropped = [(w[i] == 0).all().item() for i in range(4)]
    assert any(rows_kept) and any(rows_dropped)


def test_ratios_of_one_leave_the_loss_unchanged() -> None:
    """On-policy samples (engine == actor): TIS, ICEPOP, seq_mis and decoupled all weigh 1."""
    lp = torch.tensor([[-0.5, -1.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    for name, fn in CORRECTIONS.items():
        w, _ = fn(lp, lp.clone(), mask, cap=CAP, beta=BETA)
        assert w.tolist() == [[1.0, 1.0, 0.0]], name


def test_config_checks_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"algorithm.is_cap|is_cap \(0.5\) must be >= 1"):
        AlgorithmConfig(is_correction="tis", is_cap=0.5)
    with pytest.raises(ConfigError, match=r"is_beta \(1.0\) must be > 1"):
        AlgorithmConfig(is_correction="icepop", is_beta=1.0)
    with pytest.raises(ConfigError, match="is_correction"):
        AlgorithmConfig(is_correction="bogus")  # type: ignore[arg-type]
