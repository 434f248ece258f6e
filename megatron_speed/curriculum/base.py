"""The curriculum decides, between rollout and loss, which prompts are sampled and which groups train.

Protocol: `plan()` returns the `SampleRequest`s for the next ONE generation call; `update(groups)`
takes the scored groups of that call and returns the groups to train on now, or `None` when not
enough finished groups exist yet. State needed to resume lives in `state_dict()`.

`UniformCurriculum` ("none") is the base algorithms' behaviour: every step samples
`prompts_per_step` fresh prompts with `rollout.n` responses each and trains on all of them.
"speed" (`speed.SpeedCurriculum`) and "dapo" (`dapo.DynamicSamplingCurriculum`) select groups and
may need several generation calls per step; both raise `CurriculumStarved` once
`curriculum.max_calls_per_step` calls in a row have produced no batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from megatron_speed.config.schema import CurriculumConfig
from megatron_speed.curriculum.buffered import CurriculumStarved
from megatron_speed.curriculum.dapo import DynamicSamplingCurriculum
from megatron_speed.curriculum.speed import SpeedCurriculum
from megatron_speed.data.sampler import PromptSampler
from megatron_speed.records import RolloutGroup, SampleRequest


class Curriculum(Protocol):
    def plan(self) -> list[SampleRequest]: ...

    def update(self, groups: list[RolloutGroup]) -> list[RolloutGroup] | None: ...

    def metrics(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class UniformCurriculum:
    """No selection: train on every sampled prompt."""

    def __init__(self, cfg: CurriculumConfig, sampler: PromptSampler, *, n: int, max_lag: int = 0) -> None:
        # `max_lag` is unused: every call is one fresh batch, and the engines' wait bounds its age.
        self.cfg, self.sampler, self.n = cfg, sampler, n

    def plan(self) -> list[SampleRequest]:
        prompts = self.sampler.next(self.cfg.prompts_per_step)
        return [SampleRequest(prompt=p, n=self.n, phase="train") for p in prompts]

    def update(self, groups: list[RolloutGroup]) -> list[RolloutGroup] | None:
        return groups

    def metrics(self) -> dict[str, float]:
        return {"curriculum/epoch": float(self.sampler.epoch)}

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])


CURRICULA: dict[str, Callable[..., Curriculum]] = {
    "none": UniformCurriculum,
    "speed": SpeedCurriculum,
    "dapo": DynamicSamplingCurriculum,
}

__all__ = ["CURRICULA", "Curriculum", "CurriculumStarved", "build_curriculum"]


def build_curriculum(cfg: CurriculumConfig, sampler: PromptSampler, *, n: int, max_lag: int = 0) -> Curriculum:
    """The curriculum named by `cfg.name`; `n` is `rollout.n` (SPEED uses n_init/n_continue instead);
    `max_lag` is a disaggregated run's `rollout.max_staleness` (buffered samples older than the next
    batch's weights by more than it are left out, a group with fewer than two left is dropped, both
    counted as stale; 0 = synchronous)."""
    return CURRICULA[cfg.name](cfg, sampler, n=n, max_lag=max_lag)
