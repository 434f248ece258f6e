"""Disaggregated placement without processes: config rules, the curriculum's staleness bound under a
lagging engine, per-sample versions through SPEED and the batch, and the per-step async metrics."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from megatron_speed.config.base import ConfigError
from megatron_speed.config.schema import CurriculumConfig, RolloutConfig
from megatron_speed.curriculum.base import build_curriculum
from megatron_speed.curriculum.batch import build_train_batch
from megatron_speed.data.sampler import PromptSampler
from megatron_speed.recipes import load_recipe
from megatron_speed.records import Completion, RolloutGroup, SampleRequest
from megatron_speed.rollout.placement import Delivery, TrainerSide
from megatron_speed.setup import check_trimmed_rows
from megatron_speed.trainer import mismatch_by_age, staleness_metrics
from tests.unit.test_curriculum import FakeEngine, records


def test_placement_config_rules_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"rollout.max_staleness.*needs rollout.placement=disaggregated"):
        load_recipe("toy_cpu", ["rollout.max_staleness=1"])
    with pytest.raises(ConfigError, match=r"rollout.num_ranks \(0\) must be >= 1"):
        load_recipe("toy_cpu", ["rollout.placement=disaggregated"])
    with pytest.raises(ConfigError, match=r"num_ranks \(2\) only applies to rollout.placement=disaggregated"):
        RolloutConfig(num_ranks=2)
    with pytest.raises(ConfigError, match=r"num_ranks \(3\) must be a multiple of rollout.tensor_parallel_size"):
        RolloutConfig(placement="disaggregated", num_ranks=3, tensor_parallel_size=2)
    with pytest.raises(ConfigError, match=r"algorithm\.tis_cap"):
        load_recipe("toy_cpu", ["algorithm.tis_cap=2"])  # folded into algorithm.is_correction=tis
    cfg = load_recipe("toy_cpu", ["rollout.placement=disaggregated", "rollout.num_ranks=1", "rollout.max_staleness=2"])
    assert cfg.rollout.max_staleness == 2


def test_trimmed_speed_groups_must_split_over_the_trainers_data_parallel_ranks() -> None:
    disaggregated = ["rollout.placement=disaggregated", "rollout.num_ranks=1", "curriculum.name=speed",
                     "curriculum.n_init=4", "curriculum.n_continue=6", "optim.mini_batch_size=32",
                     "optim.micro_batch_size=16"]
    cfg = load_recipe("toy_cpu", [*disaggregated, "rollout.max_staleness=1"])
    check_trimmed_rows(cfg, 2)
    with pytest.raises(ConfigError, match=r"curriculum.n_continue \(6\) must be a multiple of the trainer's data-par"):
        check_trimmed_rows(cfg, 4)
    check_trimmed_rows(load_recipe("toy_cpu", disaggregated), 4)  # synchronous: no group is trimmed
    packed = ["optim.pack_sequences=true", "optim.micro_batch_tokens=4096"]
    check_trimmed_rows(load_recipe("toy_cpu", [*disaggregated, "rollout.max_staleness=1", *packed]), 4)


@pytest.mark.parametrize("lag", [1, 2])
def test_speed_under_a_lagging_engine_never_emits_a_group_older_than_the_bound(lag: int) -> None:
    """The engine generates with the oldest weights the wait rule allows (version = batches - lag); the
    curriculum drops buffered groups that would train more than `lag` versions stale, and batch k
    (training version k - 1) holds no sample older than k - 1 - lag."""
    probs = [0.5] * 12 + [0.0] * 4 + [1.0] * 4
    cfg = CurriculumConfig(name="speed", prompts_per_step=3, n_init=2, n_continue=2, screen_prompts_per_call=6,
                           max_calls_per_step=0)
    curriculum = build_curriculum(cfg, PromptSampler(records(len(probs)), seed=3), n=4, max_lag=lag)
    engine = FakeEngine({f"p{i}": p for i, p in enumerate(probs)}, seed=5)
    batches: list[list] = []
    for _ in range(60):
        version = max(0, len(batches) - lag)  # the stalest weights the engines may generate with
        out = curriculum.update(engine.generate(curriculum.plan(), policy_version=version))
        if out is not None:
            batches.append(out)
    assert len(batches) >= 10
    for k, batch in enumerate(batches, start=1):
        assert min(g.policy_version for g in batch) >= k - 1 - lag
        assert min(v for g in batch for v in g.sample_versions) >= k - 1 - lag  # per sample, too
        assert all(len(g.rewards) == len(g.completions) >= 2 for g in batch)
    tally = curriculum.tally
    assert tally.groups_stale + tally.groups_trimmed > 0  # the bound had work to do


def _answer(requests: list[SampleRequest], version: int,
            rewards: dict[tuple[str, str], list[float]]) -> list[RolloutGroup]:
    """Scored groups for `requests`, every sample stamped with `version`; a screening request gets
    rewards [1, 0] (accepted) unless `rewards` names its (uid, phase). Token ids: (version, uid, index)."""
    groups = []
    for r in requests:
        scores = rewards.get((r.prompt.uid, r.phase), [1.0, 0.0])
        uid = int(r.prompt.uid[1:])
        completions = [Completion(token_ids=(version, uid, i), logprobs=(-0.5,), text="", finish_reason="stop",
                                  policy_version=version) for i in range(r.n)]
        groups.append(RolloutGroup(prompt=r.prompt, prompt_token_ids=(1,), completions=completions, phase=r.phase,
                                   policy_version=version, rewards=list(scores)))
    return groups


def _screened_then_continued_a_version_later(n_continue: int) -> tuple[Any, list[list[RolloutGroup]]]:
    """SPEED at max_lag=1 under an engine a full lag behind: p2 is screened at version 0 while batch 2
    is emitted, and continued at version 1, so at batch 3 (training version 2) its screening samples
    are 2 versions old and its continuation 1. Returns the curriculum and the batches emitted."""
    cfg = CurriculumConfig(name="speed", prompts_per_step=1, n_init=2, n_continue=n_continue,
                           screen_prompts_per_call=1, max_calls_per_step=0)
    curriculum = build_curriculum(cfg, PromptSampler(records(4), seed=0, shuffle=False), n=4, max_lag=1)
    cont = [float(i % 2 == 0) for i in range(n_continue)]  # unlike the screening rewards [1, 0]
    batches = []
    for version in (0, 0, 0, 1):  # the stalest weights the wait rule allows: batches emitted - 1
        plan = curriculum.plan()
        out = curriculum.update(_answer(plan, version, {(r.prompt.uid, "continue"): cont[:r.n] for r in plan}))
        batches.append(out)
    return curriculum, batches


def test_speed_trims_screening_samples_older_than_the_lag_and_trains_the_continuation() -> None:
    curriculum, batches = _screened_then_continued_a_version_later(n_continue=2)
    assert [b is not None for b in batches] == [False, True, True, True]
    assert [len(b[0].completions) for b in batches[1:3]] == [4, 4]  # versions 0: within the bound
    (group,) = batches[3]
    assert group.prompt.uid == "p2" and group.phase == "train"
    assert [c.token_ids for c in group.completions] == [(1, 2, 0), (1, 2, 1)]  # the continuation only
    assert group.rewards == [1.0, 0.0] and group.sample_versions == [1, 1] and group.policy_version == 1
    tally = curriculum.tally
    assert (tally.groups_trimmed, tally.samples_stale, tally.groups_stale) == (1, 2, 0)
    assert tally.samples_emitted == 4 + 4 + 2
    m = curriculum.metrics()
    assert m["curriculum/trimmed_stale_groups"] == 1.0 and m["curriculum/dropped_stale_samples"] == 2.0
    assert m["curriculum/emitted_age_max"] == 1.0  # the trimmed group's age is its oldest remaining sample's
    train = build_train_batch(batches[3], pad_id=0)
    assert train.rewards.tolist() == [1.0, 0.0] and train.staleness(2) == [1, 1]


def test_speed_drops_the_whole_group_when_fewer_than_two_samples_would_remain() -> None:
    curriculum, batches = _screened_then_continued_a_version_later(n_continue=1)
    assert batches[3] is None  # p2's one fresh sample cannot form a group
    tally = curriculum.tally
    assert (tally.groups_trimmed, tally.groups_stale, tally.samples_stale) == (0, 1, 3)
    assert curriculum.metrics()["curriculum/dropped_stale_groups"] == 1.0


def test_per_sample_versions_survive_speed_merge_and_reach_the_batch() -> None:
    cfg = CurriculumConfig(name="speed", prompts_per_step=1, n_init=2, n_continue=2, screen_prompts_per_call=1,
                           max_calls_per_step=0)
    curriculum = build_curriculum(cfg, PromptSampler(records(1), seed=0), n=4)
    engine = FakeEngine({"p0": 0.5}, seed=1)
    for version in range(10):
        groups = engine.generate(curriculum.plan(), policy_version=version)
        for g in groups:  # the real engine stamps every completion
            g.completions = [type(c)(**{**c.__dict__, "policy_version": version}) for c in g.completions]
        batch = curriculum.update(groups)
        if batch is not None:
            break
    group = batch[0]
    assert group.sample_versions[:2] == [group.policy_version] * 2  # screening samples
    assert group.sample_versions[2:] == [group.policy_version + 1] * 2  # continued one call later
    train = build_train_batch(batch, pad_id=0)
    assert train.versions.tolist() == group.sample_versions
    assert train.staleness(group.policy_version + 1) == [1, 1, 0, 0]


def test_staleness_and_mismatch_by_age() -> None:
    m = staleness_metrics([0, 0, 1, 1, 1, 2])
    assert m["async/staleness_mean"] == pytest.approx(5 / 6) and m["async/staleness_max"] == 2.0
    assert m["async/staleness_fraction/1"] == pytest.approx(0.5)
    actor = torch.zeros(3, 2)
    engine = torch.tensor([[0.0, 0.0], [0.5, 0.5], [0.5, 0.5]])
    out = mismatch_by_age(actor, engine, torch.ones(3, 2), [0, 1, 1])
    assert out["mismatch/logprob_abs_diff/age0"] == 0.0 and out["mismatch/logprob_abs_diff/age1"] == 0.5
    assert out["mismatch/logprob_abs_diff"] == pytest.approx(1 / 3)
    assert "mismatch/kl_k3/age0" not in mismatch_by_age(actor, actor, torch.ones(3, 2), [0, 0, 0])


def test_overlap_is_the_generation_time_that_ran_while_the_actor_trained() -> None:
    side = TrainerSide.__new__(TrainerSide)
    side.busy, side.idle = [(10.0, 14.0), (20.0, 22.0)], 1.5
    delivery = Delivery(index=3, groups=[], scalars={}, engine_busy=[(9.0, 11.0), (13.0, 16.0), (21.0, 21.5)],
                        engine_idle=0.25)
    m = side.step_metrics(delivery, 2)
    assert m["async/engine_busy_seconds"] == pytest.approx(5.5)
    assert m["async/overlap_seconds"] == pytest.approx(1.0 + 1.0 + 0.5)
    assert m["async/overlap_fraction"] == pytest.approx(2.5 / 5.5)
    assert m["async/trainer_idle_seconds"] == 1.5 and m["async/engine_idle_seconds"] == 0.25
    assert side.idle == 0.0
