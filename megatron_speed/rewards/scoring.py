"""Score rollout groups in place with the sandboxed pool and report what went wrong."""

from __future__ import annotations

from collections.abc import Sequence

from megatron_speed.records import RolloutGroup
from megatron_speed.rewards.pool import RewardPool


def score_groups(pool: RewardPool, groups: Sequence[RolloutGroup]) -> dict[str, float]:
    """Set `group.rewards` for every group; a timeout or grader crash scores 0 and is counted."""
    items = [(c.text, g.prompt.answer) for g in groups for c in g.completions]
    result = pool.score(items)
    scores = iter(result.scores)
    for g in groups:
        g.rewards = [next(scores) for _ in g.completions]
    return {"reward/timeouts": float(result.timeouts), "reward/errors": float(result.errors)}
