"""SPEED-RL (arXiv 2506.09016): screen prompts cheaply, spend the full sample budget only on the
ones whose pass rate is strictly between 0 and 1.

One generation call holds two kinds of request: `n_continue` more responses ("continue") for every
prompt accepted by the previous call, and `n_init` responses ("screen") for
`screen_prompts_per_call` new prompts from the sampler. A screened prompt is accepted iff
`accept_screened(rewards)`; its screening responses are kept and reused in training, as published.
Its continuation is merged with them into one "train" group of `n_init + n_continue` responses
(screening first) whose `policy_version` is the oldest of its samples, and queued FIFO; a step
trains on the oldest `prompts_per_step` finished groups and the surplus waits.

Differences from the reference code, on purpose: phases are carried by the requests, never guessed
from the group size, so `n_continue == n_init` works; every accepted prompt is continued in the
very next call (no "multiple of #GPUs" leftovers); no sampler batch is ever skipped; the same
prompt drawn twice is two draws with their own request ids. Mixed-policy groups are kept (as the
paper does); `curriculum.max_staleness` bounds how old they may get (whole groups). A group continued
in the call right after its screening is usually 1 version old when emitted (a train step sat in
between), so `max_staleness=1` keeps the steady state and drops only surplus that waited longer.
Under a disaggregated run's `rollout.max_staleness=N` (`max_lag`) with the engine a full lag ahead, a
group's screening samples come from the call before its continuation, one version older: those more
than N versions older than the weights they would train are left out (counted as stale samples, the
group as trimmed) and the group trains on the rest (`BufferedCurriculum._within_lag`).

Surplus control: while the ready buffer already holds a full train batch, a call screens no new
prompts (it only continues the accepted ones, possibly an empty call, which the engine answers at
once). This is the reference's "train from the buffer without generating", expressed as a smaller
call, so the buffer stays below prompts_per_step + one call's acceptances.
"""

from __future__ import annotations

from typing import Any

from megatron_speed.config.schema import CurriculumConfig
from megatron_speed.curriculum.buffered import BufferedCurriculum, Ticket, group_from_state, group_to_state
from megatron_speed.curriculum.rules import accept_screened
from megatron_speed.data.sampler import PromptSampler
from megatron_speed.records import RolloutGroup


def merge_screen_and_continuation(screen: RolloutGroup, cont: RolloutGroup) -> RolloutGroup:
    """One "train" group: screening responses first, then the continuation's; oldest policy version."""
    if screen.prompt != cont.prompt or screen.prompt_token_ids != cont.prompt_token_ids:
        raise ValueError(f"cannot merge groups of different prompts: screening {screen.prompt.uid!r} and "
                         f"continuation {cont.prompt.uid!r} (or their prompt tokens differ)")
    return RolloutGroup(prompt=screen.prompt, prompt_token_ids=screen.prompt_token_ids,
                        completions=[*screen.completions, *cont.completions], phase="train",
                        policy_version=min(screen.policy_version, cont.policy_version),
                        rewards=[*screen.rewards, *cont.rewards])


class SpeedCurriculum(BufferedCurriculum):
    """SPEED's screen-then-continue controller; `n` (rollout.n) is not used, see the module doc."""

    name = "speed"
    knobs = "curriculum.n_init or curriculum.screen_prompts_per_call"

    def __init__(self, cfg: CurriculumConfig, sampler: PromptSampler, *, n: int, max_lag: int = 0) -> None:
        super().__init__(cfg, sampler, max_lag=max_lag)
        # Accepted screening groups by request id, until their continuation returns (queued or in flight).
        self._screened: dict[int, RolloutGroup] = {}
        self._awaiting: list[int] = []  # request ids in `_screened` not yet sent for continuation

    def phases(self) -> tuple[str, ...]:
        return ("screen", "continue")

    def metrics(self) -> dict[str, float]:
        return {**super().metrics(), "curriculum/pending_continuations": float(len(self._screened))}

    def _new_tickets(self) -> list[Ticket]:
        """Continue every accepted prompt (its own request id), then screen new prompts."""
        cfg = self.cfg
        cont = [Ticket(request_id=i, prompt=self._screened[i].prompt, n=cfg.n_continue, phase="continue")
                for i in self._awaiting]
        self._awaiting = []
        full = len(self._ready) >= cfg.prompts_per_step
        fresh = [] if full else self.sampler.next(cfg.screen_prompts_per_call)
        screen = [self._ticket(p, cfg.n_init, "screen") for p in fresh]
        return cont + screen

    def _absorb(self, ticket: Ticket, group: RolloutGroup) -> None:
        if ticket.phase == "screen":
            accepted = accept_screened(group.rewards)
            self._judge(group, accepted)
            if accepted:
                self._screened[ticket.request_id] = group
                self._awaiting.append(ticket.request_id)
            return
        screen = self._screened.pop(ticket.request_id)
        self._make_ready(ticket.request_id, merge_screen_and_continuation(screen, group))

    def _extra_state(self) -> dict[str, Any]:
        screened = [{"request_id": i, "group": group_to_state(g)} for i, g in self._screened.items()]
        return {"screened": screened, "awaiting": list(self._awaiting)}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._screened = {int(s["request_id"]): group_from_state(s["group"]) for s in state["screened"]}
        self._awaiting = [int(i) for i in state["awaiting"]]
