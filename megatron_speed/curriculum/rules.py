"""The curricula's accept rules: pure functions of one group's rewards.

A response counts as correct when its reward is > 0, the same convention as
`RolloutGroup.pass_rate`. Nothing here reads the config or the policy.
"""

from __future__ import annotations

from collections.abc import Sequence

MIN_GROUP_SIZE = 2
"""The fewest responses a trained group may have: a leave-one-out or group-normalised baseline needs
another sample of the same prompt, and one response has no reward spread."""


def pass_count(rewards: Sequence[float]) -> int:
    """How many responses of the group are correct (reward > 0)."""
    return sum(1 for r in rewards if r > 0)


def accept_screened(rewards: Sequence[float]) -> bool:
    """SPEED's screening test: keep a prompt iff its screening pass rate is strictly inside (0, 1).

    This is the published rule (Alg. 1, 0 < p_hat < 1) and nothing more: no other threshold. An
    empty group has no pass rate and is rejected.
    """
    return 0 < pass_count(rewards) < len(rewards)


def has_reward_spread(rewards: Sequence[float]) -> bool:
    """DAPO's dynamic-sampling test: keep a group iff its rewards are not all equal (std > 0).

    Unlike verl, a group of one response is not kept: it has no spread, and a leave-one-out or
    group-normalised advantage would be zero or undefined for it.
    """
    return len(rewards) >= MIN_GROUP_SIZE and max(rewards) != min(rewards)


def all_correct(rewards: Sequence[float]) -> bool:
    """True when every response is correct; used to label a rejected group all-correct vs all-wrong."""
    return pass_count(rewards) == len(rewards)
