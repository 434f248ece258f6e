"""Held-out accuracy: greedy decoding on held-out prompts, graded by the same sandboxed pool.

avg@k / pass@k at a temperature and standalone evaluation of checkpoints arrive with the evaluation
work; the loop needs one robust number, greedy accuracy, and that is what this computes.
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_speed.records import PromptRecord
from megatron_speed.rewards.pool import RewardPool
from megatron_speed.rollout.engine import VLLMEngine


def heldout_accuracy(engine: VLLMEngine, pool: RewardPool, records: Sequence[PromptRecord]) -> float:
    texts = engine.generate_greedy(records)
    result = pool.score([(text, r.answer) for text, r in zip(texts, records)])
    return sum(s > 0 for s in result.scores) / max(len(records), 1)
