"""Time to target (metrics/targets.py): on hand-made curves, through the trainer's summary into
summary.json for the papers' five held-out sets, the paper recipes' targets, and the config's errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_speed.config.base import ConfigError
from megatron_speed.evaluate import EvalReport, SetResult
from megatron_speed.main import report
from megatron_speed.metrics.targets import check_target_sets, first_reach, time_to_target
from megatron_speed.recipes import load_recipe
from megatron_speed.recipes.papers import PAPER_RECIPES
from megatron_speed.trainer import Trainer


def test_reached_between_evaluations_is_interpolated() -> None:
    curve = [(0.0, 0.6), (10.0, 0.7), (20.0, 0.8)]
    assert first_reach(curve, 0.75) == pytest.approx(15.0)
    out = time_to_target({"s": curve}, [0, 5, 10], {"s": 0.72})
    assert out["s"]["seconds"] == pytest.approx(12.0) and out["s"]["step"] == pytest.approx(6.0)
    # a dip after the crossing does not move it; a curve that dips below and comes back counts the first time
    assert first_reach([(0, 0.5), (4, 0.9), (8, 0.4), (12, 0.95)], 0.7) == pytest.approx(2.0)


def test_reached_at_the_first_evaluation_and_never() -> None:
    curve = [(3.0, 0.8), (10.0, 0.7)]
    assert first_reach(curve, 0.8) == 3.0
    assert time_to_target({"s": curve}, [0, 5], {"s": 0.8})["s"] == {"target": 0.8, "seconds": 3.0, "step": 0.0}
    assert first_reach(curve, 0.81) is None
    assert time_to_target({"s": curve}, [0, 5], {"s": 0.9})["s"] == {"target": 0.9, "seconds": None, "step": None}
    assert first_reach([], 0.5) is None


def test_steps_that_do_not_line_up_give_no_step() -> None:
    out = time_to_target({"s": [(0.0, 0.1), (8.0, 0.9)]}, [], {"s": 0.5})  # resumed from an older checkpoint
    assert out["s"]["seconds"] == pytest.approx(4.0) and out["s"]["step"] is None


class _ScriptedRollout:
    """Hands the trainer one prepared evaluation report per call, as the engine would."""

    def __init__(self, reports: list[EvalReport]) -> None:
        self.reports = iter(reports)

    def evaluate(self, version: int, run: object) -> EvalReport:
        return next(self.reports)


def _report(aime24: float, aime25: float, amc23: float, math500: float, dapo: float) -> EvalReport:
    sets = {"aime24": SetResult(name="aime24", prompts=30, k=16, avg_at_k=aime24),
            "aime25": SetResult(name="aime25", prompts=30, k=16, avg_at_k=aime25),
            "amc23": SetResult(name="amc23", prompts=83, k=4, avg_at_k=amc23),
            "math500": SetResult(name="math500", prompts=500, k=1, avg_at_k=math500),
            "dapo17k_heldout": SetResult(name="dapo17k_heldout", prompts=1000, k=1, avg_at_k=dapo)}
    return EvalReport(sets=sets, greedy_accuracy=None, settings={})


def test_five_set_summary_through_the_trainer(tmp_path: Path) -> None:
    """Three evaluations (RL steps 0, 25, 50 at 0, 100, 200 RL seconds) of the 7B paper recipe's five
    sets, through `Trainer.evaluate` / `Trainer.summary` and `main.report` into summary.json."""
    cfg = load_recipe("speed_rloo__qwen2.5-math-7b__dapo17k", ["metrics.plot=false"])
    trainer = Trainer.__new__(Trainer)
    trainer.cfg, trainer.curve, trainer.warm = cfg, [], 0.0
    trainer.set_curves, trainer.set_metrics, trainer.eval_steps = {}, {}, []
    trainer.eval_seconds = trainer.save_seconds = 0.0
    trainer.parts = SimpleNamespace(actor=SimpleNamespace(version=0), dims=SimpleNamespace(is_main=True),
                                    out_dir=tmp_path, stop=None)
    trainer.rollout = _ScriptedRollout([_report(0.10, 0.06, 0.56, 0.70, 0.30), _report(0.20, 0.12, 0.50, 0.78, 0.35),
                                        _report(0.30, 0.18, 0.60, 0.82, 0.40)])
    clock = iter([0.0, 100.0, 200.0, 200.0])
    trainer._rl_seconds = lambda: next(clock)  # type: ignore[method-assign]
    for step in (0, 25, 50):
        trainer.evaluate(step)
    report(cfg, tmp_path, trainer.summary(50, final=trainer.curve[-1][1]), model_path=tmp_path / "hf",
           setup_seconds=1.0, total_seconds=2.0)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["eval_steps"] == [0, 25, 50]
    assert summary["set_metrics"] == {"aime24": "avg@16", "aime25": "avg@16", "amc23": "avg@4", "math500": "avg@1",
                                      "dapo17k_heldout": "avg@1"}
    hits = summary["time_to_target"]
    assert set(hits) == {"dapo17k_heldout", "math500", "amc23", "aime24+aime25"}
    assert hits["math500"]["target"] == 0.8  # 0.78 -> 0.82: half way from step 25 to 50
    assert (hits["math500"]["seconds"], hits["math500"]["step"]) == (pytest.approx(150.0), pytest.approx(37.5))
    assert (hits["amc23"]["seconds"], hits["amc23"]["step"]) == (0.0, 0.0)  # at the warm start already
    assert hits["dapo17k_heldout"] == {"target": 0.45, "seconds": None, "step": None}
    # AIME is the mean of the two sets (0.08, 0.16, 0.24), not AIME24 alone (which passes 0.18 before step 25)
    assert (hits["aime24+aime25"]["seconds"], hits["aime24+aime25"]["step"]) == (pytest.approx(125.0),
                                                                                 pytest.approx(31.25))


@pytest.mark.parametrize("name", sorted(PAPER_RECIPES))
def test_paper_recipes_carry_the_papers_targets(name: str) -> None:
    """reference/algorithms.md §1.6: 7B DAPO-1k 0.45, MATH500 0.80, AMC23 0.55, AIME avg(24,25) 0.18;
    1.5B 0.30 / 0.70 / 0.40 / 0.10 in the same order. JSPO reports no times to a target."""
    targets = PAPER_RECIPES[name]().eval.target_map()
    if name.startswith("jspo"):
        assert targets == {}
        return
    expected = (0.45, 0.80, 0.55, 0.18) if "qwen2.5-math-7b" in name else (0.30, 0.70, 0.40, 0.10)
    assert targets == dict(zip(("dapo17k_heldout", "math500", "amc23", "aime24+aime25"), expected, strict=True))
    assert all(set(t.split("+")) <= set(PAPER_RECIPES[name]().eval.files) for t in targets)


@pytest.mark.parametrize("entry, rule", [("math500", "is not SET=ACC"), ("math500=1.5", r"no accuracy in \(0, 1\]"),
                                         ("aime24+=0.2", "is not SET=ACC"), ("math500=high", "no accuracy"),
                                         ("=0.5", "is not SET=ACC")])
def test_bad_targets_name_the_key(entry: str, rule: str) -> None:
    with pytest.raises(ConfigError, match=rf"^eval\.targets .*{rule}"):
        load_recipe("toy_cpu", [f"eval.targets=[{entry}]"])


def test_targets_parse_and_reject_duplicates_and_unknown_sets() -> None:
    cfg = load_recipe("toy_cpu", ["eval.targets=[toy-add=0.7, a + b=0.5]"])
    assert cfg.eval.target_map() == {"toy-add": 0.7, "a+b": 0.5}
    with pytest.raises(ConfigError, match=r"^eval\.targets .*names a set twice"):
        load_recipe("toy_cpu", ["eval.targets=[toy-add=0.7,toy-add=0.8]"])
    check_target_sets({"aime24+aime25": 0.18}, {"aime24", "aime25", "math500"})
    with pytest.raises(ConfigError, match=r"^eval\.targets \('aime24\+aime26'\) names held-out set\(s\) \['aime26'\]"):
        check_target_sets({"aime24+aime26": 0.18}, {"aime24", "aime25"})
