"""The reproduction script's arithmetic (time to target, aggregation over seeds, speed-ups) and the
per-set headline metrics it reads, on hand-made runs whose answers are known."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import reproduce_toy as rt

from megatron_speed.evaluate import EvalReport, SetResult


def test_defaults_are_what_benchmarks_reports() -> None:
    """The issue-11 section of BENCHMARKS.md states its --every and targets; the script's defaults are those
    (time to target itself is the package's `metrics.targets.first_reach`, tested in test_targets.py)."""
    text = (Path(rt.ROOT) / "BENCHMARKS.md").read_text()
    section = text[text.index("(issue 11)"):]
    section = section[:section.index("\n## ")] if "\n## " in section else section
    command = " ".join(section[section.index("Command:"):].split())
    every = re.search(r"--every (\d+)", command)
    targets = re.search(r"--targets narrow=([\d.]+) wide=([\d.]+)", command)
    assert every and targets, command
    assert rt.build_parser().parse_args([]).every == int(every.group(1))
    assert (rt.POOLS["narrow"][1], rt.POOLS["wide"][1]) == (float(targets.group(1)), float(targets.group(2)))


def _run(tmp: Path, name: str, *, curve: list[list[float]], speed: bool, mini: int, zero: list[int]) -> Path:
    run = tmp / name
    run.mkdir()
    cfg = {"curriculum": {"name": "speed" if speed else "none", "prompts_per_step": 4, "n_init": 2,
                          "n_continue": 2},
           "rollout": {"n": 4}, "optim": {"mini_batch_size": mini}}
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "summary.json").write_text(json.dumps({
        "set_curves": {"toy-add": curve}, "set_metrics": {"toy-add": "greedy"}, "warm_start_accuracy": curve[0][1],
        "final_accuracy": curve[-1][1], "steps": len(zero), "seconds": curve[-1][0]}))
    rows = [{"step": 0, "eval/accuracy": curve[0][1]}]
    for step, z in enumerate(zero, 1):
        rows.append({"step": step, "rollout/generated_tokens": 100, "rollout/all_correct_groups": z,
                     "rollout/all_wrong_groups": 0, "curriculum/samples_generated": 40.0 * step,
                     "curriculum/samples_rejected": 10.0 * step})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return run


def test_measure_reads_updates_tokens_and_shares(tmp_path: Path) -> None:
    base = rt.measure(_run(tmp_path, "base", curve=[[0, 0.5], [10, 0.9]], speed=False, mini=16, zero=[2, 1]), 0.7)
    assert base["time_to_target_s"] == pytest.approx(5.0)
    assert (base["steps"], base["updates"], base["generated_tokens"]) == (2, 2, 200)
    assert base["zero_variance_share"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    speed = rt.measure(_run(tmp_path, "speed", curve=[[0, 0.5], [4, 0.9]], speed=True, mini=8, zero=[0, 0, 0]), 0.7)
    assert speed["updates"] == 3 * 2 and speed["zero_variance_share"] is None  # only the baselines' share
    assert speed["screening_overhead"] == pytest.approx(0.25)


def test_aggregate_and_speedups_over_seeds() -> None:
    def fake(t: float | None) -> dict:
        return {"time_to_target_s": t, "final": 0.8, "steps": 10, "updates": 10, "generated_tokens": 1000,
                "zero_variance_share": None, "screening_overhead": None}

    table = {"RLOO": rt.aggregate([fake(30.0), fake(50.0), fake(None)]),
             "SPEED-RLOO upstream": rt.aggregate([fake(10.0), fake(30.0), fake(20.0)])}
    assert table["RLOO"]["reached"] == 2 and table["RLOO"]["time_to_target_s"][0] == pytest.approx(40.0)
    assert table["SPEED-RLOO upstream"]["time_to_target_s"] == pytest.approx((20.0, 10.0))
    assert rt.speedups(table) == {"SPEED-RLOO upstream vs RLOO": pytest.approx(2.0)}


def test_upstream_mode_sets_verl_mini_batch() -> None:
    extra = rt.arm_overrides("SPEED-RLOO upstream", "wide")
    assert "optim.mini_batch_size=128" in extra and "optim.lr_schedule_unit=rl_step" in extra  # 32 x n_init 4
    assert "data.toy.max_digits=6" in extra
    assert rt.arm_overrides("SPEED-RLOO controlled", "narrow") == []


def test_headline_is_avg_at_k_when_sampled_and_pooled_without_greedy() -> None:
    sampled = SetResult(name="aime24", prompts=30, k=16, avg_at_k=0.2)
    greedy = SetResult(name="toy-add", prompts=10, greedy_accuracy=0.7)
    assert sampled.headline == ("avg@16", 0.2) and greedy.headline == ("greedy", 0.7)
    report = EvalReport(sets={"aime24": sampled, "math500": SetResult(name="math500", prompts=10, k=1, avg_at_k=0.6)},
                        greedy_accuracy=None, settings={})
    assert report.pooled_accuracy == pytest.approx((0.2 * 30 + 0.6 * 10) / 40)
