"""What the selecting curricula (SPEED, DAPO dynamic sampling) share: a FIFO of finished groups.

A selecting curriculum issues one generation call at a time (`plan()`), judges the scored groups
(`update()`), appends the groups it keeps to a first-in-first-out ready buffer and emits the oldest
`prompts_per_step` of them once there are enough; the surplus waits for later steps. This module
holds that machinery; a subclass only says which requests a call makes (`_new_tickets`) and what
happens to each returned group (`_absorb`).

Invariants kept here:
- every request carries a curriculum-issued, monotonically increasing request id (`Ticket`), so two
  draws of the same prompt (next epoch) never mix samples; the engine must return one group per
  request, in request order, and `update()` checks the prompt, phase and size of each;
- plan() and update() strictly alternate; a state saved between them re-issues the same call;
- every generated sample ends up in exactly one place: an emitted batch, a buffer, a counted
  rejection, a counted stale drop (a whole group, or the samples trimmed off one) or a counted
  discarded surplus (`Tally`).

Deliberately left out: anything that talks to the engine, the grader or torch.distributed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Sequence
from typing import Any

from megatron_speed.config.schema import CurriculumConfig
from megatron_speed.curriculum.rules import MIN_GROUP_SIZE, all_correct
from megatron_speed.data.sampler import PromptSampler
from megatron_speed.records import Completion, PromptRecord, RolloutGroup, SampleRequest

log = logging.getLogger(__name__)


class CurriculumStarved(RuntimeError):
    """`curriculum.max_calls_per_step` generation calls in a row produced no train batch."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Ticket:
    """One request of a generation call; `request_id` identifies the prompt draw it belongs to."""

    request_id: int
    prompt: PromptRecord
    n: int
    phase: str

    def request(self) -> SampleRequest:
        return SampleRequest(prompt=self.prompt, n=self.n, phase=self.phase)

    def to_state(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "prompt": dataclasses.asdict(self.prompt), "n": self.n,
                "phase": self.phase}

    @staticmethod
    def from_state(state: dict[str, Any]) -> Ticket:
        return Ticket(request_id=int(state["request_id"]), prompt=PromptRecord(**state["prompt"]),
                      n=int(state["n"]), phase=str(state["phase"]))


@dataclasses.dataclass(kw_only=True)
class Tally:
    """Cumulative counts since the start of the run; they are part of the resumable state."""

    calls: int = 0
    batches: int = 0
    judged: int = 0  # groups that went through the accept rule
    accepted: int = 0
    rejected_all_correct: int = 0
    rejected_all_wrong: int = 0
    samples_generated: int = 0
    samples_rejected: int = 0
    groups_stale: int = 0  # whole groups dropped as too old
    samples_stale: int = 0  # their samples, plus those trimmed off groups that still train
    groups_trimmed: int = 0  # groups that lost samples older than `max_lag` and kept the rest
    groups_discarded: int = 0  # kept groups dropped after a batch was emitted (DAPO "discard" surplus)
    samples_discarded: int = 0
    groups_emitted: int = 0
    samples_emitted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.judged if self.judged else 0.0


@dataclasses.dataclass(kw_only=True)
class CallStats:
    """Figures of the last generation call only (reset by every `update()`)."""

    judged: int = 0
    accepted: int = 0
    generated_tokens: dict[str, int] = dataclasses.field(default_factory=dict)  # by request phase
    train_tokens: int = 0  # completion tokens of the emitted batch
    emitted_ages: list[int] = dataclasses.field(default_factory=list)  # policy versions, per group
    calls_for_batch: int = 0  # generation calls the emitted batch took (0: none emitted)


def completion_tokens(group: RolloutGroup) -> int:
    """Completion (response) token ids in the group; the prompt is not counted."""
    return sum(len(c.token_ids) for c in group.completions)


def group_to_state(group: RolloutGroup) -> dict[str, Any]:
    """Plain dicts, lists, tuples and scalars: survives pickle, torch.save and JSON (`group_from_state`)."""
    return dataclasses.asdict(group)


def group_from_state(state: dict[str, Any]) -> RolloutGroup:
    """Inverse of `group_to_state`, also for JSON-decoded state (lists where tuples were)."""
    completions = [Completion(token_ids=tuple(int(t) for t in c["token_ids"]),
                              logprobs=tuple(float(x) for x in c["logprobs"]), text=str(c["text"]),
                              finish_reason=str(c["finish_reason"]),
                              policy_version=int(c.get("policy_version", state["policy_version"])))
                   for c in state["completions"]]
    return RolloutGroup(prompt=PromptRecord(**state["prompt"]),
                        prompt_token_ids=tuple(int(t) for t in state["prompt_token_ids"]),
                        completions=completions, phase=str(state["phase"]),
                        policy_version=int(state["policy_version"]),
                        rewards=[float(r) for r in state["rewards"]])


def check_call(tickets: Sequence[Ticket], groups: Sequence[RolloutGroup]) -> None:
    """Raise unless `groups` answer `tickets` one to one, in order, with one reward per response."""
    if len(groups) != len(tickets):
        raise ValueError(f"the curriculum planned {len(tickets)} requests but update() got {len(groups)} "
                         "groups: pass every group of the call, in request order")
    for i, (t, g) in enumerate(zip(tickets, groups)):
        if g.prompt.uid != t.prompt.uid or g.phase != t.phase or len(g.completions) != t.n:
            raise ValueError(f"group {i} is for prompt {g.prompt.uid!r} ({g.phase}, {len(g.completions)} "
                             f"responses) but request {i} asked for {t.prompt.uid!r} ({t.phase}, n={t.n}): "
                             "the engine must return one group per request, in request order")
        if len(g.rewards) != len(g.completions):
            raise ValueError(f"group {i} ({g.prompt.uid!r}) has {len(g.completions)} responses but "
                             f"{len(g.rewards)} rewards: score the groups before update()")


class BufferedCurriculum:
    """Base of the selecting curricula; see the module docstring. Subclasses set `name`."""

    name = "buffered"
    knobs = ""  # config fields that raise the acceptance, named in the starvation message

    def __init__(self, cfg: CurriculumConfig, sampler: PromptSampler, *, max_lag: int = 0) -> None:
        # `max_lag`: rollout.max_staleness of a disaggregated run (0 = synchronous, no extra bound).
        self.cfg, self.sampler, self.max_lag = cfg, sampler, max_lag
        self.tally = Tally()
        self._last = CallStats()
        self._next_id = 0
        self._version = 0  # newest policy version seen in a call: the one the next batch trains
        self._dry_calls = 0  # calls in a row without a batch
        self._ready: deque[tuple[int, RolloutGroup]] = deque()
        self._in_flight: list[Ticket] | None = None
        self._reissue: list[Ticket] | None = None  # a call that was in flight when state was saved

    # ------------------------------------------------------------------ protocol

    def plan(self) -> list[SampleRequest]:
        """The requests of the next generation call (the same call again after a mid-call resume)."""
        if self._in_flight is not None:
            raise RuntimeError("plan() called twice without update(): generate, score, then update()")
        tickets = self._reissue if self._reissue is not None else self._new_tickets()
        self._reissue = None
        self._in_flight = tickets
        return [t.request() for t in tickets]

    def update(self, groups: list[RolloutGroup]) -> list[RolloutGroup] | None:
        """Judge the call's scored groups; the oldest `prompts_per_step` ready groups, or None."""
        if self._in_flight is None:
            raise RuntimeError("update() without plan(): call plan(), generate, score, then update()")
        check_call(self._in_flight, groups)
        tickets, self._in_flight = self._in_flight, None
        self._last = CallStats()
        self.tally.calls += 1
        for ticket, group in zip(tickets, groups):
            self.tally.samples_generated += len(group.completions)
            tokens = self._last.generated_tokens
            tokens[ticket.phase] = tokens.get(ticket.phase, 0) + completion_tokens(group)
            self._absorb(ticket, group)
        self._version = max([self._version, *(g.policy_version for g in groups)])
        self._drop_stale()
        batch = self._emit()
        self._after_call(batch is not None)
        return batch

    def metrics(self) -> dict[str, float]:
        """Scalars for the step's log: last call, cumulative counts and buffer sizes."""
        t, last = self.tally, self._last
        ages = last.emitted_ages
        out = {"curriculum/epoch": float(self.sampler.epoch),
               "curriculum/acceptance_rate": last.accepted / last.judged if last.judged else 0.0,
               "curriculum/acceptance_rate_cumulative": t.acceptance,
               "curriculum/train_tokens": float(last.train_tokens),
               "curriculum/ready_groups": float(len(self._ready)),
               "curriculum/emitted_age_mean": sum(ages) / len(ages) if ages else 0.0,
               "curriculum/emitted_age_max": float(max(ages, default=0)),
               "curriculum/calls_for_batch": float(last.calls_for_batch),
               "curriculum/dropped_stale_groups": float(t.groups_stale),
               "curriculum/dropped_stale_samples": float(t.samples_stale),
               "curriculum/trimmed_stale_groups": float(t.groups_trimmed),
               "curriculum/discarded_surplus_groups": float(t.groups_discarded),
               "curriculum/samples_generated": float(t.samples_generated),
               "curriculum/samples_rejected": float(t.samples_rejected),
               "curriculum/rejected_all_correct": float(t.rejected_all_correct),
               "curriculum/rejected_all_wrong": float(t.rejected_all_wrong)}
        for phase in self.phases():
            out[f"curriculum/generated_tokens_{phase}"] = float(last.generated_tokens.get(phase, 0))
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly; plain containers only (pickle, torch.save, JSON)."""
        call = self._in_flight if self._in_flight is not None else self._reissue
        return {"curriculum": self.name, "sampler": self.sampler.state_dict(), "next_id": self._next_id,
                "version": self._version, "dry_calls": self._dry_calls,
                "tally": dataclasses.asdict(self.tally), "last": dataclasses.asdict(self._last),
                "ready": [{"request_id": i, "group": group_to_state(g)} for i, g in self._ready],
                "in_flight": None if call is None else [t.to_state() for t in call],
                "extra": self._extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`; a call that was in flight is re-issued by the next plan()."""
        if state["curriculum"] != self.name:
            raise ValueError(f"curriculum state was saved by {state['curriculum']!r} but this run uses "
                             f"curriculum.name={self.name!r}: resume with the same curriculum")
        self.sampler.load_state_dict(state["sampler"])
        self._next_id, self._version = int(state["next_id"]), int(state["version"])
        self._dry_calls = int(state["dry_calls"])
        self.tally = Tally(**state["tally"])
        self._last = CallStats(**state["last"])
        self._ready = deque((int(r["request_id"]), group_from_state(r["group"])) for r in state["ready"])
        self._in_flight = None
        call = state["in_flight"]
        self._reissue = None if call is None else [Ticket.from_state(t) for t in call]
        self._load_extra_state(state["extra"])

    # ------------------------------------------------------------------ subclass hooks

    def phases(self) -> tuple[str, ...]:
        """The request phases this curriculum issues (one generated-tokens metric each)."""
        raise NotImplementedError

    def _new_tickets(self) -> list[Ticket]:
        """The requests of a fresh generation call."""
        raise NotImplementedError

    def _absorb(self, ticket: Ticket, group: RolloutGroup) -> None:
        """Judge or merge one scored group; keep it via `_judge` / `_make_ready`."""
        raise NotImplementedError

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `_extra_state` saved."""

    # ------------------------------------------------------------------ helpers for subclasses

    def _ticket(self, prompt: PromptRecord, n: int, phase: str) -> Ticket:
        """A request for a new draw of `prompt`, with a fresh request id."""
        ticket = Ticket(request_id=self._next_id, prompt=prompt, n=n, phase=phase)
        self._next_id += 1
        return ticket

    def _judge(self, group: RolloutGroup, accepted: bool) -> None:
        """Count one accept-rule decision; a rejected group's samples are dropped here."""
        self.tally.judged += 1
        self._last.judged += 1
        if accepted:
            self.tally.accepted += 1
            self._last.accepted += 1
            return
        self.tally.samples_rejected += len(group.completions)
        if all_correct(group.rewards):
            self.tally.rejected_all_correct += 1
        else:
            self.tally.rejected_all_wrong += 1

    def _make_ready(self, request_id: int, group: RolloutGroup) -> None:
        self._ready.append((request_id, group))

    def _discard_ready(self) -> None:
        """Drop every ready group, counted as discarded surplus."""
        for _, group in self._ready:
            self.tally.groups_discarded += 1
            self.tally.samples_discarded += len(group.completions)
        self._ready.clear()

    # ------------------------------------------------------------------ internals

    def _drop_stale(self) -> None:
        """Apply both staleness bounds to the ready groups.

        `curriculum.max_staleness` (SPEED's own carry-over limit, upstream semantics) drops a whole
        group whose oldest sample is more than that many versions older than the newest weights seen.
        `max_lag` (a disaggregated run's `rollout.max_staleness` >= 1) is per sample: batch k of the
        run trains version k - 1, i.e. `tally.batches` before it is emitted, and a sample more than
        `max_lag` versions older than that is left out (`_within_lag`). Under a lagging engine a SPEED
        group's screening samples come from the call before its continuation, so they are the ones
        trimmed, and the group trains on its continuation.

        Age only grows while a group waits, so a sample stale now would be stale when emitted.
        """
        limit, lag = self.cfg.max_staleness, self.max_lag
        if not limit and not lag:
            return
        kept: deque[tuple[int, RolloutGroup]] = deque()
        for request_id, group in self._ready:
            fresh = None if limit and self._version - group.policy_version > limit else self._within_lag(group)
            if fresh is None:
                self.tally.groups_stale += 1
                self.tally.samples_stale += len(group.completions)
            else:
                kept.append((request_id, fresh))
        self._ready = kept

    def _within_lag(self, group: RolloutGroup) -> RolloutGroup | None:
        """`group` without its samples more than `max_lag` versions older than the next batch's weights:
        the group itself when none is (or `max_lag` is 0), None when fewer than `MIN_GROUP_SIZE` would
        remain (the caller drops it whole). A trimmed group keeps its samples' order and rewards, and
        its `policy_version` becomes its oldest remaining sample's; the trimmed samples are counted."""
        if not self.max_lag:
            return group
        oldest = self.tally.batches - self.max_lag
        keep = [i for i, c in enumerate(group.completions) if c.policy_version >= oldest]
        if len(keep) == len(group.completions):
            return group
        if len(keep) < MIN_GROUP_SIZE:
            return None
        self.tally.groups_trimmed += 1
        self.tally.samples_stale += len(group.completions) - len(keep)
        completions = [group.completions[i] for i in keep]
        return dataclasses.replace(group, completions=completions, rewards=[group.rewards[i] for i in keep],
                                   policy_version=min(c.policy_version for c in completions))

    def _emit(self) -> list[RolloutGroup] | None:
        """The oldest `prompts_per_step` ready groups (FIFO), or None while fewer are ready."""
        k = self.cfg.prompts_per_step
        if len(self._ready) < k:
            return None
        batch = [self._ready.popleft()[1] for _ in range(k)]
        self.tally.batches += 1
        self.tally.groups_emitted += k
        self.tally.samples_emitted += sum(len(g.completions) for g in batch)
        self._last.train_tokens = sum(completion_tokens(g) for g in batch)
        self._last.emitted_ages = [self._version - g.policy_version for g in batch]
        # The batch is trained before the next call, so the policy is one version newer from here on,
        # even if the next call returns no group to say so (an empty call while the buffer is full).
        self._version += 1
        return batch

    def _after_call(self, produced: bool) -> None:
        """Starvation guard: warn every `warn_after_calls`, raise at `max_calls_per_step` dry calls."""
        if produced:
            self._last.calls_for_batch = self._dry_calls + 1
            self._dry_calls = 0
            return
        self._dry_calls += 1
        limit, warn = self.cfg.max_calls_per_step, self.cfg.warn_after_calls
        if limit and self._dry_calls >= limit:
            raise CurriculumStarved(f"{self._starvation_report()} The limit is curriculum.max_calls_per_step"
                                    f"={limit}. {self._starvation_advice()}")
        if warn and self._dry_calls % warn == 0:
            log.warning("%s Still generating (limit curriculum.max_calls_per_step=%d, 0 = none).",
                        self._starvation_report(), limit)

    def _starvation_report(self) -> str:
        t = self.tally
        return (f"curriculum {self.name!r}: {self._dry_calls} generation calls in a row produced no train "
                f"batch; acceptance rate so far {t.acceptance:.1%} ({t.accepted}/{t.judged} groups kept; "
                f"rejected {t.rejected_all_wrong} all-wrong, {t.rejected_all_correct} all-correct; "
                f"{t.groups_stale} dropped as stale); {len(self._ready)}/{self.cfg.prompts_per_step} "
                "groups ready.")

    def _starvation_advice(self) -> str:
        t = self.tally
        if t.rejected_all_wrong >= t.rejected_all_correct:
            why = "Most rejected prompts are all-wrong: the data is too hard for this policy."
        else:
            why = "Most rejected prompts are all-correct: the data is too easy for this policy."
        stale = " or raise curriculum.max_staleness (0 = unlimited)" if t.groups_stale else ""
        return (f"{why} Use data matched to the model, raise {self.knobs}, lower "
                f"curriculum.prompts_per_step{stale}, or set curriculum.max_calls_per_step=0 to wait "
                "without limit.")
