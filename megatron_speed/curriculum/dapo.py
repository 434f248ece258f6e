"""DAPO dynamic sampling (verl `recipe/dapo`): train only on groups whose rewards are not all equal.

Each generation call samples `dapo_prompts_per_call` new prompts with `rollout.n` responses
("train" requests). Groups with `has_reward_spread(rewards)` are queued FIFO; a step trains on the
oldest `prompts_per_step` of them. Zero-spread groups are dropped and counted as all-correct or
all-wrong. What happens to the kept groups beyond the batch is `curriculum.dapo_surplus`:
- "discard" (verl's DAPO trainer): they are dropped and counted once the batch is emitted, so every
  step starts from an empty buffer and trains only on samples of the current policy;
- "keep" (ours): they wait for later steps (bounded by `max_staleness` if set), and while they fill
  a batch no new prompts are sampled; no generated sample is wasted, at one version of staleness.
"""

from __future__ import annotations

from megatron_speed.config.schema import CurriculumConfig
from megatron_speed.curriculum.buffered import BufferedCurriculum, Ticket
from megatron_speed.curriculum.rules import has_reward_spread
from megatron_speed.data.sampler import PromptSampler
from megatron_speed.records import RolloutGroup


class DynamicSamplingCurriculum(BufferedCurriculum):
    """Sample, keep groups with a reward spread, emit FIFO; `n` is `rollout.n`."""

    name = "dapo"
    knobs = "rollout.n or curriculum.dapo_prompts_per_call"

    def __init__(self, cfg: CurriculumConfig, sampler: PromptSampler, *, n: int, max_lag: int = 0) -> None:
        super().__init__(cfg, sampler, max_lag=max_lag)
        self.n = n

    def phases(self) -> tuple[str, ...]:
        return ("train",)

    def _new_tickets(self) -> list[Ticket]:
        """New prompts, unless the buffer already holds a full batch (then an empty call)."""
        if len(self._ready) >= self.cfg.prompts_per_step:
            return []
        return [self._ticket(p, self.n, "train") for p in self.sampler.next(self.cfg.dapo_prompts_per_call)]

    def _emit(self) -> list[RolloutGroup] | None:
        batch = super()._emit()
        if batch is not None and self.cfg.dapo_surplus == "discard":
            self._discard_ready()
        return batch

    def _absorb(self, ticket: Ticket, group: RolloutGroup) -> None:
        kept = has_reward_spread(group.rewards)
        self._judge(group, kept)
        if kept:
            self._make_ready(ticket.request_id, group)
