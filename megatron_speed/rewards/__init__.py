"""Rewards: graders (pure `(response, answer) -> float` functions) and the process pool that runs them."""

from megatron_speed.rewards.graders import GRADERS, math_verify_grader, math_verify_response_grader, resolve_grader
from megatron_speed.rewards.pool import RewardPool, ScoreResult

__all__ = ["GRADERS", "RewardPool", "ScoreResult", "math_verify_grader", "math_verify_response_grader",
           "resolve_grader"]
