"""SPEED and DAPO dynamic-sampling controllers, driven by a fake engine and scorer (no vLLM, no grader).

The fake engine gives every response a run-wide unique sample id (stored in its token ids) and
draws its reward from a seeded RNG with a per-prompt pass probability. The tests follow each
sample from generation to an emitted batch, a buffer or a counted drop, and each prompt draw from
its screening request to its continuation.
"""

from __future__ import annotations

import copy
import json
import logging
import pickle
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from megatron_speed.config.base import ConfigError
from megatron_speed.config.loader import load_config
from megatron_speed.config.schema import Config, CurriculumConfig, DataConfig, OptimConfig, ToyTaskConfig
from megatron_speed.curriculum.base import Curriculum, CurriculumStarved, build_curriculum
from megatron_speed.curriculum.rules import accept_screened, has_reward_spread
from megatron_speed.data.sampler import PromptSampler
from megatron_speed.records import Completion, PromptRecord, RolloutGroup, SampleRequest

SEED = 7


@dataclass(frozen=True)
class Origin:
    """Where one sample came from."""

    uid: str
    phase: str
    request: int  # engine-side serial of the request
    call: int
    version: int
    reward: float


class FakeEngine:
    """Generates and scores in one go; rewards are Bernoulli(pass_prob[uid]) from a seeded RNG."""

    def __init__(self, pass_prob: dict[str, float], seed: int) -> None:
        self.pass_prob = pass_prob
        self.rng = random.Random(seed)
        self.origin: dict[int, Origin] = {}
        self.calls: list[list[RolloutGroup]] = []
        self.requests = 0

    def generate(self, requests: Sequence[SampleRequest], *, policy_version: int) -> list[RolloutGroup]:
        groups = [self._group(r, len(self.calls), policy_version) for r in requests]
        self.calls.append(groups)
        return groups

    def _group(self, request: SampleRequest, call: int, version: int) -> RolloutGroup:
        serial, self.requests = self.requests, self.requests + 1
        completions, rewards = [], []
        for _ in range(request.n):
            sid = len(self.origin)
            reward = 1.0 if self.rng.random() < self.pass_prob[request.prompt.uid] else 0.0
            self.origin[sid] = Origin(request.prompt.uid, request.phase, serial, call, version, reward)
            length = 1 + sid % 3
            completions.append(Completion(token_ids=(sid,) * length, logprobs=(-0.5,) * length,
                                          text=f"s{sid}", finish_reason="stop", policy_version=version))
            rewards.append(reward)
        return RolloutGroup(prompt=request.prompt, prompt_token_ids=(1, 2, 3), completions=completions,
                            phase=request.phase, policy_version=version, rewards=rewards)


def sample_ids(group: RolloutGroup) -> list[int]:
    return [c.token_ids[0] for c in group.completions]


def records(k: int) -> list[PromptRecord]:
    return [PromptRecord(uid=f"p{i}", prompt=f"question {i}", answer=str(i)) for i in range(k)]


@dataclass
class Driver:
    """The trainer's loop without a model: plan, generate + score, update; a batch bumps the version."""

    curriculum: Curriculum
    engine: FakeEngine
    version: int = 0
    batches: list[tuple[int, list[RolloutGroup]]] = field(default_factory=list)

    def step(self) -> list[RolloutGroup] | None:
        groups = self.engine.generate(self.curriculum.plan(), policy_version=self.version)
        batch = self.curriculum.update(groups)
        if batch is not None:
            self.batches.append((self.version, batch))
            self.version += 1
        return batch

    def run(self, calls: int) -> None:
        for _ in range(calls):
            self.step()


def make(name: str, probs: Sequence[float], *, seed: int = SEED, n: int = 4, **fields: Any) -> Driver:
    recs = records(len(probs))
    cfg = CurriculumConfig(**{"name": name, "max_calls_per_step": 0, **fields})
    curriculum = build_curriculum(cfg, PromptSampler(recs, seed=seed), n=n)
    return Driver(curriculum, FakeEngine({r.uid: p for r, p in zip(recs, probs)}, seed))


def restore(driver: Driver, state: dict[str, Any], n_records: int, seed: int = SEED, n: int = 4) -> Driver:
    """A fresh curriculum loaded from `state`, with a copy of the engine as it stood then."""
    cfg = driver.curriculum.cfg  # type: ignore[attr-defined]
    curriculum = build_curriculum(cfg, PromptSampler(records(n_records), seed=seed), n=n)
    curriculum.load_state_dict(state)
    return Driver(curriculum, copy.deepcopy(driver.engine), version=driver.version)


def describe(batches: list[tuple[int, list[RolloutGroup]]]) -> list[Any]:
    return [(v, [(g.prompt.uid, tuple(sample_ids(g)), tuple(g.rewards), g.policy_version) for g in b])
            for v, b in batches]


def uniform(rewards: Sequence[float]) -> bool:
    return len(set(rewards)) == 1


def buffered_ids(state: dict[str, Any]) -> list[int]:
    groups = [r["group"] for r in state["ready"]] + [s["group"] for s in state["extra"].get("screened", [])]
    return [c["token_ids"][0] for g in groups for c in g["completions"]]


def check_conservation(d: Driver, rejected: list[int]) -> None:
    """Every generated sample is in exactly one batch, buffer or counted rejection/stale drop/discard."""
    emitted = [s for _, b in d.batches for g in b for s in sample_ids(g)]
    state = d.curriculum.state_dict()
    buffered = buffered_ids(state)
    placed = emitted + buffered + rejected
    assert len(placed) == len(set(placed)), "a sample is in two places"
    assert set(placed) <= set(d.engine.origin)
    tally = state["tally"]
    assert tally["samples_generated"] == len(d.engine.origin)
    assert tally["samples_emitted"] == len(emitted) and tally["samples_rejected"] == len(rejected)
    assert len(d.engine.origin) - len(placed) == tally["samples_stale"] + tally["samples_discarded"]
    if not d.curriculum.cfg.max_staleness:  # type: ignore[attr-defined]
        assert tally["samples_stale"] == 0
    if getattr(d.curriculum.cfg, "dapo_surplus", "keep") == "keep" or d.curriculum.cfg.name != "dapo":  # type: ignore[attr-defined]
        assert tally["samples_discarded"] == 0


def check_fifo(d: Driver, key: str) -> None:
    """Groups are emitted oldest-first and never twice: their last request serials strictly increase."""
    serials = [d.engine.origin[sample_ids(g)[-1]].request for _, b in d.batches for g in b]
    assert serials == sorted(serials) and len(serials) == len(set(serials)), key


# ------------------------------------------------------------------ pure rules


@given(st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=12))
def test_accept_screened_is_strictly_mixed_pass_rate(rewards: list[float]) -> None:
    assert accept_screened(rewards) == (0 < sum(rewards) < len(rewards))


@given(st.lists(st.floats(-2, 2, allow_nan=False), max_size=8))
def test_has_reward_spread_means_not_all_equal(rewards: list[float]) -> None:
    assert has_reward_spread(rewards) == (len(set(rewards)) > 1)


def test_rules_on_shaped_rewards() -> None:
    assert not accept_screened([]) and not accept_screened([0.0, -0.5])  # no correct response
    assert accept_screened([1.0, -0.2]) and has_reward_spread([0.0, -0.5])


# ------------------------------------------------------------------ SPEED


def speed_checks(d: Driver, cfg: CurriculumConfig, calls: int, n_records: int) -> None:
    """Requests: the screening stream is the sampler's (a call screens nothing only while a full batch
    is already buffered), and every accepted draw is continued next call."""
    screened = [g.prompt.uid for groups in d.engine.calls for g in groups if g.phase == "screen"]
    stream = PromptSampler(records(n_records), seed=SEED).next(cfg.screen_prompts_per_call * calls)
    assert screened == [p.uid for p in stream][:len(screened)]
    per_call = [sum(g.phase == "screen" for g in groups) for groups in d.engine.calls]
    assert set(per_call) <= {0, cfg.screen_prompts_per_call}
    for t, groups in enumerate(d.engine.calls):
        cont = Counter(g.prompt.uid for g in groups if g.phase == "continue")
        before = d.engine.calls[t - 1] if t else []
        accepted = Counter(g.prompt.uid for g in before if g.phase == "screen" and not uniform(g.rewards))
        assert cont == accepted
        sizes = {"screen": cfg.n_init, "continue": cfg.n_continue}
        assert all(len(g.completions) == sizes[g.phase] for g in groups)
    for version, batch in d.batches:
        assert len(batch) == cfg.prompts_per_step
        for g in batch:
            speed_group_checks(d, cfg, g, version)
        assert len({sample_ids(g)[0] for g in batch}) == len(batch)


def speed_group_checks(d: Driver, cfg: CurriculumConfig, g: RolloutGroup, version: int) -> None:
    origins = [d.engine.origin[s] for s in sample_ids(g)]
    head, tail = origins[:cfg.n_init], origins[cfg.n_init:]
    assert g.phase == "train" and len(origins) == cfg.n_init + cfg.n_continue
    assert {o.phase for o in head} == {"screen"} and {o.phase for o in tail} == {"continue"}
    assert len({o.request for o in head}) == 1 and len({o.request for o in tail}) == 1
    assert {o.uid for o in origins} == {g.prompt.uid}
    assert tail[0].call == head[0].call + 1
    assert g.rewards == [o.reward for o in origins]
    assert 0 < sum(r > 0 for r in g.rewards) < len(g.rewards)
    assert g.policy_version == min(o.version for o in origins)
    if cfg.max_staleness:
        assert version - g.policy_version <= cfg.max_staleness


def speed_rejected(d: Driver) -> list[int]:
    return [s for groups in d.engine.calls for g in groups
            if g.phase == "screen" and uniform(g.rewards) for s in sample_ids(g)]


probabilities = st.lists(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]) | st.floats(0, 1),
                         min_size=2, max_size=10)


@settings(max_examples=60, deadline=None)
@given(n_init=st.integers(2, 5), n_continue=st.integers(1, 6), per_step=st.integers(1, 4),
       screen=st.integers(1, 8), probs=probabilities, calls=st.integers(1, 12), staleness=st.integers(0, 3))
@example(n_init=4, n_continue=4, per_step=2, screen=6, probs=[0.5, 0.3, 0.0, 1.0, 0.7], calls=10, staleness=0)
def test_speed_conserves_samples_and_emits_valid_groups(n_init: int, n_continue: int, per_step: int,
                                                          screen: int, probs: list[float], calls: int,
                                                          staleness: int) -> None:
    fields = dict(n_init=n_init, n_continue=n_continue, prompts_per_step=per_step,
                  screen_prompts_per_call=screen, max_staleness=staleness)
    d = make("speed", probs, **fields)
    d.run(calls)
    cfg = d.curriculum.cfg  # type: ignore[attr-defined]
    speed_checks(d, cfg, calls, len(probs))
    check_conservation(d, speed_rejected(d))
    check_fifo(d, "speed")
    again = make("speed", probs, **fields)
    again.run(calls)
    assert describe(again.batches) == describe(d.batches)
    assert again.curriculum.metrics() == d.curriculum.metrics()


def test_speed_with_equal_n_init_and_n_continue_tracks_phases() -> None:
    d = make("speed", [0.5] * 8, n_init=3, n_continue=3, prompts_per_step=2, screen_prompts_per_call=4)
    d.run(6)
    assert d.batches, "expected at least one batch"
    cfg = d.curriculum.cfg  # type: ignore[attr-defined]
    speed_checks(d, cfg, 6, 8)
    check_conservation(d, speed_rejected(d))


def test_speed_first_call_only_screens_and_metrics_count_tokens() -> None:
    d = make("speed", [0.5] * 6, prompts_per_step=2, screen_prompts_per_call=6)
    assert d.step() is None  # nothing is continued yet
    assert {g.phase for g in d.engine.calls[0]} == {"screen"}
    m = d.curriculum.metrics()
    accepted = [g for g in d.engine.calls[0] if not uniform(g.rewards)]
    assert m["curriculum/acceptance_rate"] == len(accepted) / 6
    assert m["curriculum/pending_continuations"] == len(accepted)
    screen_tokens = sum(len(c.token_ids) for g in d.engine.calls[0] for c in g.completions)
    assert m["curriculum/generated_tokens_screen"] == screen_tokens
    assert m["curriculum/generated_tokens_continue"] == 0 and m["curriculum/train_tokens"] == 0
    batch = d.step()
    assert batch is not None
    m = d.curriculum.metrics()
    continued = [g for g in d.engine.calls[1] if g.phase == "continue"]
    cont_tokens = sum(len(c.token_ids) for g in continued for c in g.completions)
    assert m["curriculum/generated_tokens_continue"] == cont_tokens
    assert m["curriculum/train_tokens"] == sum(len(c.token_ids) for g in batch for c in g.completions)
    assert m["curriculum/calls_for_batch"] == 2 and m["curriculum/emitted_age_max"] == 0
    assert m["curriculum/ready_groups"] == len(accepted) - 2


def test_speed_same_prompt_drawn_twice_never_mixes() -> None:
    # Two prompts, four screened per call: every call draws each prompt twice.
    d = make("speed", [0.5, 0.5], prompts_per_step=3, screen_prompts_per_call=4, n_init=2, n_continue=3)
    d.run(8)
    assert d.batches
    cfg = d.curriculum.cfg  # type: ignore[attr-defined]
    speed_checks(d, cfg, 8, 2)
    check_conservation(d, speed_rejected(d))


def test_speed_staleness_drops_are_counted() -> None:
    # Acceptance ~7/8 of 8 screened per call, 1 emitted: the surplus ages and must be dropped.
    d = make("speed", [0.5] * 10, prompts_per_step=1, screen_prompts_per_call=8, max_staleness=1)
    d.run(8)
    m = d.curriculum.metrics()
    assert m["curriculum/dropped_stale_groups"] > 0
    assert m["curriculum/dropped_stale_samples"] == 24 * m["curriculum/dropped_stale_groups"]
    assert all(v - g.policy_version <= 1 for v, b in d.batches for g in b)
    check_conservation(d, speed_rejected(d))
    unlimited = make("speed", [0.5] * 10, prompts_per_step=1, screen_prompts_per_call=8)
    unlimited.run(8)
    assert unlimited.curriculum.metrics()["curriculum/dropped_stale_groups"] == 0
    assert unlimited.curriculum.metrics()["curriculum/emitted_age_max"] > 1


# ------------------------------------------------------------------ resuming


def roundtrip(state: dict[str, Any], how: str) -> dict[str, Any]:
    if how == "json":
        return json.loads(json.dumps(state))
    if how == "torch":
        import io

        import torch

        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=True)
    return pickle.loads(pickle.dumps(state))


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(["speed", "dapo"]), before=st.integers(0, 6), after=st.integers(1, 6),
       mid_call=st.booleans(), how=st.sampled_from(["json", "pickle"]), staleness=st.integers(0, 2))
def test_state_dict_round_trip_continues_identically(name: str, before: int, after: int, mid_call: bool,
                                                     how: str, staleness: int) -> None:
    probs = [0.5, 0.2, 0.0, 0.9, 1.0, 0.6, 0.4]
    fields = dict(prompts_per_step=2, screen_prompts_per_call=5, dapo_prompts_per_call=4,
                  n_init=3, n_continue=2, max_staleness=staleness)
    d = make(name, probs, **fields)
    d.run(before)
    if mid_call:  # saved between plan() and update(): the same call is re-issued
        requests = d.curriculum.plan()
        state = roundtrip(d.curriculum.state_dict(), how)
        resumed = restore(d, state, len(probs))
        assert resumed.curriculum.plan() == requests
        for driver in (d, resumed):
            groups = driver.engine.generate(requests, policy_version=driver.version)
            if driver.curriculum.update(groups) is not None:
                driver.version += 1
    else:
        resumed = restore(d, roundtrip(d.curriculum.state_dict(), how), len(probs))
    done = len(d.batches)
    d.run(after)
    resumed.run(after)
    assert describe(resumed.batches) == describe(d.batches[done:])
    assert resumed.curriculum.metrics() == d.curriculum.metrics()
    assert json.dumps(resumed.curriculum.state_dict()) == json.dumps(d.curriculum.state_dict())


def test_state_survives_torch_save() -> None:
    d = make("speed", [0.5] * 6, prompts_per_step=2, screen_prompts_per_call=4)
    d.run(3)
    state = roundtrip(d.curriculum.state_dict(), "torch")
    resumed = restore(d, state, 6)
    done = len(d.batches)
    d.run(3)
    resumed.run(3)
    assert resumed.batches and describe(resumed.batches) == describe(d.batches[done:])


def test_load_rejects_another_curriculum() -> None:
    d = make("speed", [0.5] * 4)
    other = make("dapo", [0.5] * 4)
    with pytest.raises(ValueError, match=r"curriculum\.name='dapo'"):
        other.curriculum.load_state_dict(d.curriculum.state_dict())


def test_protocol_misuse_is_reported() -> None:
    d = make("speed", [0.5] * 4, screen_prompts_per_call=2)
    with pytest.raises(RuntimeError, match="update\\(\\) without plan\\(\\)"):
        d.curriculum.update([])
    requests = d.curriculum.plan()
    with pytest.raises(RuntimeError, match="plan\\(\\) called twice"):
        d.curriculum.plan()
    groups = d.engine.generate(requests, policy_version=0)
    for wrong in (groups[:1], groups[::-1]):
        with pytest.raises(ValueError, match="in request order"):
            d.curriculum.update(wrong)
    groups[0].rewards = []
    with pytest.raises(ValueError, match="score the groups"):
        d.curriculum.update(groups)


# ------------------------------------------------------------------ starvation


def test_speed_starvation_raises_with_acceptance_and_advice(caplog: pytest.LogCaptureFixture) -> None:
    d = make("speed", [0.0] * 8, screen_prompts_per_call=4, max_calls_per_step=3, warn_after_calls=2)
    with caplog.at_level(logging.WARNING):
        assert d.step() is None and not caplog.records
        assert d.step() is None
    assert "2 generation calls in a row produced no train batch" in caplog.text
    assert "acceptance rate so far 0.0%" in caplog.text
    with pytest.raises(CurriculumStarved) as info:
        d.step()
    message = str(info.value)
    for words in ("3 generation calls in a row", "acceptance rate so far 0.0% (0/12", "12 all-wrong",
                  "curriculum.max_calls_per_step=3", "too hard", "curriculum.n_init", "max_calls_per_step=0"):
        assert words in message


def test_dapo_starvation_on_all_correct_prompts() -> None:
    d = make("dapo", [1.0] * 4, dapo_prompts_per_call=3, max_calls_per_step=2)
    assert d.step() is None
    with pytest.raises(CurriculumStarved, match=r"too easy.*rollout\.n or curriculum\.dapo_prompts_per_call"):
        d.step()


# ------------------------------------------------------------------ DAPO


def dapo_rejected(d: Driver) -> list[int]:
    return [s for groups in d.engine.calls for g in groups if uniform(g.rewards) for s in sample_ids(g)]


@settings(max_examples=50, deadline=None)
@given(n=st.integers(2, 6), per_step=st.integers(1, 4), per_call=st.integers(1, 8), probs=probabilities,
       calls=st.integers(1, 10), staleness=st.integers(0, 2))
def test_dapo_conserves_samples_and_never_emits_zero_spread(n: int, per_step: int, per_call: int,
                                                            probs: list[float], calls: int,
                                                            staleness: int) -> None:
    fields = dict(prompts_per_step=per_step, dapo_prompts_per_call=per_call, max_staleness=staleness)
    d = make("dapo", probs, n=n, **fields)
    d.run(calls)
    for version, batch in d.batches:
        assert len(batch) == per_step
        for g in batch:
            assert g.phase == "train" and len(g.completions) == n and has_reward_spread(g.rewards)
            assert not staleness or version - g.policy_version <= staleness
    check_conservation(d, dapo_rejected(d))
    check_fifo(d, "dapo")
    again = make("dapo", probs, n=n, **fields)
    again.run(calls)
    assert describe(again.batches) == describe(d.batches)


def test_dapo_keeps_the_surplus_for_the_next_step() -> None:
    d = make("dapo", [0.5] * 16, prompts_per_step=2, dapo_prompts_per_call=8)
    first = d.step()
    kept = [g for g in d.engine.calls[0] if has_reward_spread(g.rewards)]
    assert first is not None and [sample_ids(g) for g in first] == [sample_ids(g) for g in kept[:2]]
    assert d.curriculum.metrics()["curriculum/ready_groups"] == len(kept) - 2 > 0
    second = d.step()
    assert second is not None and [sample_ids(g) for g in second] == [sample_ids(g) for g in kept[2:4]]


@settings(max_examples=50, deadline=None)
@given(n=st.integers(2, 6), per_step=st.integers(1, 4), per_call=st.integers(1, 8), probs=probabilities,
       calls=st.integers(1, 12))
def test_dapo_discard_mode_never_trains_a_stale_group(n: int, per_step: int, per_call: int, probs: list[float],
                                                      calls: int) -> None:
    """verl's DAPO: the kept groups beyond the batch are dropped, so every trained group comes from the
    policy being trained (age 0) and each step starts from an empty buffer."""
    d = make("dapo", probs, n=n, prompts_per_step=per_step, dapo_prompts_per_call=per_call, dapo_surplus="discard")
    d.run(calls)
    for version, batch in d.batches:
        assert all(g.policy_version == version for g in batch)
    tally = d.curriculum.state_dict()["tally"]
    kept = sum(has_reward_spread(g.rewards) for groups in d.engine.calls for g in groups)
    buffered = len(d.curriculum.state_dict()["ready"])
    assert tally["groups_discarded"] == kept - len(d.batches) * per_step - buffered
    check_conservation(d, dapo_rejected(d))
    check_fifo(d, "dapo-discard")


def test_dapo_discard_drops_the_surplus_and_samples_again() -> None:
    d = make("dapo", [0.5] * 16, prompts_per_step=2, dapo_prompts_per_call=8, dapo_surplus="discard")
    first = d.step()
    kept = [g for g in d.engine.calls[0] if has_reward_spread(g.rewards)]
    assert first is not None and len(kept) > 2
    metrics = d.curriculum.metrics()
    assert metrics["curriculum/ready_groups"] == 0 and metrics["curriculum/discarded_surplus_groups"] == len(kept) - 2
    d.step()
    assert len(d.engine.calls[1]) == 8  # the next step samples new prompts instead of using the surplus


# ------------------------------------------------------------------ config


def small_config() -> Config:
    """Toy data, 32 prompts per step, mini-batches of 32 trajectories."""
    return Config(data=DataConfig(toy=ToyTaskConfig()),
                  optim=OptimConfig(mini_batch_size=32, micro_batch_size=16))


def speed_config(*overrides: str) -> Config:
    return load_config(small_config(), ["curriculum.name=speed", *overrides])


def test_speed_config_defaults_and_trajectories_per_step() -> None:
    cfg = speed_config()
    assert (cfg.curriculum.n_init, cfg.curriculum.n_continue, cfg.curriculum.max_staleness) == (4, 20, 0)
    assert cfg.curriculum.samples_per_prompt(cfg.rollout.n) == 24
    assert speed_config("curriculum.n_continue=4").curriculum.n_continue == 4  # equal to n_init: legal
    with pytest.raises(ConfigError) as info:
        speed_config("curriculum.prompts_per_step=16", "optim.mini_batch_size=256")
    assert info.value.key == "optim.mini_batch_size"
    assert "(curriculum.n_init + curriculum.n_continue) = 384" in str(info.value)
    speed_config("curriculum.prompts_per_step=16", "optim.mini_batch_size=64")  # 384 / 64 = 6 steps


@pytest.mark.parametrize(("override", "key", "words"), [
    ("curriculum.n_init=1", "curriculum.n_init", "must be >= 2"),
    ("curriculum.n_continue=0", "curriculum.n_continue", "must be >= 1"),
    ("curriculum.screen_prompts_per_call=0", "curriculum.screen_prompts_per_call", "must be >= 1"),
    ("curriculum.max_staleness=-1", "curriculum.max_staleness", "must be >= 0"),
    ("curriculum.max_calls_per_step=1", "curriculum.max_calls_per_step", "screening call and a continuation"),
    ("curriculum.name=greedy", "curriculum.name", "must be one of 'none', 'speed', 'dapo'"),
])
def test_curriculum_config_errors_name_the_field(override: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        speed_config(override)
    assert info.value.key == key and words in str(info.value) and info.value.fix


def test_dapo_needs_two_responses() -> None:
    base = small_config()
    cfg = load_config(base, ["curriculum.name=dapo"])
    assert cfg.curriculum.samples_per_prompt(cfg.rollout.n) == cfg.rollout.n
    with pytest.raises(ConfigError) as info:
        load_config(base, ["curriculum.name=dapo", "rollout.n=1", "optim.mini_batch_size=16"])
    assert info.value.key == "rollout.n"
