"""Graders agree with math-verify on toy answers; the pool survives hangs, raises and crashes.

`math_verify_response` is pinned against `math_verify.metric.math_metric` called directly with the
papers' configuration (verl's `reward_score/math_verify.py` in SPEED-RL and JSPO-Official), on
responses where it and the last-box `math_verify` disagree.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from math_verify.metric import math_metric
from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig

from megatron_speed.rewards import (
    GRADERS,
    RewardPool,
    ScoreResult,
    math_verify_grader,
    math_verify_response_grader,
    resolve_grader,
)
from megatron_speed.rewards.graders import last_boxed
from tests.unit import graders_for_tests

SCRIPTED = "tests.unit.graders_for_tests:scripted"
TIMEOUT = 1.0  # scripted graders answer in milliseconds, so only 'hang' hits this


@pytest.mark.parametrize(
    ("response", "answer", "expected"),
    [
        (r"so the sum is \boxed{2412}", "2412", 1.0),
        (r"so the sum is \boxed{2413}", "2412", 0.0),
        ("so the sum is 2412", "2412", 0.0),
        (r"first \boxed{7}, on reflection \boxed{2412}", "2412", 1.0),
        (r"first \boxed{2412}, on reflection \boxed{7}", "2412", 0.0),
        (r"\boxed{2412.0}", "2412", 1.0),
        (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
        (r"\boxed{1+x}", "x+1", 1.0),
        (r"\boxed{\sqrt{2}}", r"$\sqrt{2}$", 1.0),
        (r"\boxed{}", "2412", 0.0),
        (r"the answer is \boxed{24", "24", 0.0),
    ],
)
def test_math_verify_grader(response: str, answer: str, expected: float) -> None:
    assert math_verify_grader(response, answer) == expected


def upstream_score(response: str, answer: str) -> float:
    """The papers' `compute_score`: math_metric with verl's configuration, 0 on any exception."""
    metric = math_metric(gold_extraction_target=(LatexExtractionConfig(),),
                         pred_extraction_target=(ExprExtractionConfig(), LatexExtractionConfig()))
    try:
        score, _ = metric(["\\boxed{" + answer + "}"], [response])
    except BaseException:
        return 0.0
    return score


# (response, gold, math_verify_response, math_verify): responses on which the two graders differ.
DIFFERING = [
    ("so the sum is 2412", "2412", 1.0, 0.0),  # an unboxed final answer
    ("Thus the final answer is $\\frac{1}{2}$.", "0.5", 1.0, 0.0),
    ("Thus $x=\\frac{3}{4}$", "\\frac{3}{4}", 1.0, 0.0),
    ("the answer is 0.75", "\\frac{3}{4}", 1.0, 0.0),
    # the last box is wrong, a later "final answer is" phrase is right and outranks boxes
    ("\\boxed{7} hmm. Therefore, the final answer is 2412.", "2412", 1.0, 0.0),
    # two boxes are read as the set {7, 2412}, which matches neither; the last box alone is right
    ("first \\boxed{7}, on reflection \\boxed{2412}", "2412", 0.0, 1.0),
    ("The answer is 12 and then 3 and finally 2412", "12", 1.0, 0.0),  # the first anchored number
]

# ... and responses on which they agree.
AGREEING = [
    ("so the sum is \\boxed{2412}", "2412", 1.0),
    ("\\boxed{2412.0}", "2412", 1.0),
    ("\\boxed{\\frac{3}{4}}", "0.75", 1.0),
    ("first \\boxed{2412}, on reflection \\boxed{7}", "2412", 0.0),  # an earlier right box does not count
    ("I get \\boxed{7}. Wait, that is wrong; the answer is 2412", "2412", 0.0),  # the box outranks "answer is"
    ("the answer is \\boxed{24", "24", 0.0),  # cut off inside the box
    ("", "7", 0.0),
    ("no numbers here", "7", 0.0),
]


@pytest.mark.parametrize(("response", "answer", "whole", "last_box"), DIFFERING)
def test_response_grader_differs_from_last_box_as_upstream(response: str, answer: str, whole: float,
                                                          last_box: float) -> None:
    assert GRADERS["math_verify_response"](response, answer) == whole == upstream_score(response, answer)
    assert math_verify_grader(response, answer) == last_box != whole


@pytest.mark.parametrize(("response", "answer", "expected"), AGREEING)
def test_response_grader_agrees_with_last_box_elsewhere(response: str, answer: str, expected: float) -> None:
    assert math_verify_response_grader(response, answer) == expected == upstream_score(response, answer)
    assert math_verify_grader(response, answer) == expected


def test_response_grader_through_the_pool() -> None:
    """Real workers: the scores above, an unextractable gold counted as an error (upstream: 0), and
    math-verify's own SIGALRM timeout (5 s on a tower of powers) working in a worker's main thread."""
    cases = DIFFERING + [(r, a, e, e) for r, a, e in AGREEING]
    items = [(r, a) for r, a, _, _ in cases]
    with RewardPool("math_verify_response", num_workers=2, timeout_seconds=30.0) as pool:
        result = pool.score(items)
        assert result.scores == [whole for _, _, whole, _ in cases]
        assert (result.timeouts, result.errors) == (0, 0)
        bad_gold = pool.score([("\\boxed{1}", ""), ("so it is 3", "3")])
        assert (bad_gold.scores, bad_gold.timeouts, bad_gold.errors) == ([0.0, 1.0], 0, 1)
        workers = pool.worker_pids
        tower = pool.score([("\\boxed{9^{9^{9^{9}}}}", "12")])
        assert (tower.scores, tower.timeouts, tower.errors) == ([0.0], 0, 0)
        assert 4.0 < tower.seconds < 25.0 and pool.worker_pids == workers
    with RewardPool("math_verify", num_workers=1, timeout_seconds=30.0) as pool:
        assert pool.score(items).scores == [last_box for _, _, _, last_box in cases]


def test_last_boxed_balances_braces() -> None:
    assert last_boxed(r"\boxed{\frac{1}{2}} and \boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert last_boxed(r"\boxed {x^{2}}") == "x^{2}"
    assert last_boxed("no box here") is None


def test_resolve_grader_by_name_and_path() -> None:
    assert resolve_grader("math_verify") is GRADERS["math_verify"] is math_verify_grader
    assert resolve_grader("math_verify_response") is math_verify_response_grader
    assert resolve_grader(SCRIPTED) is graders_for_tests.scripted


@pytest.mark.parametrize(
    "name",
    ["no_such_grader", "no.such.module:grade", "tests.unit.graders_for_tests:missing",
     "tests.unit.graders_for_tests:NOT_CALLABLE", ":grade"],
)
def test_resolve_grader_errors_name_the_grader_and_registry(name: str) -> None:
    with pytest.raises(ValueError, match="math_verify") as info:
        resolve_grader(name)
    assert repr(name) in str(info.value)


def test_pool_rejects_bad_arguments_before_spawning() -> None:
    with pytest.raises(ValueError, match="no_such_grader"):
        RewardPool("no_such_grader", num_workers=1, timeout_seconds=1.0)
    with pytest.raises(ValueError, match="num_workers"):
        RewardPool("math_verify", num_workers=0, timeout_seconds=1.0)
    with pytest.raises(ValueError, match="timeout_seconds"):
        RewardPool("math_verify", num_workers=1, timeout_seconds=0.0)


def test_math_verify_pool_scores_in_order() -> None:
    items = [(rf"\boxed{{{i if i % 3 else i + 1}}}", str(i)) for i in range(24)]
    with RewardPool("math_verify", num_workers=2, timeout_seconds=10.0) as pool:
        result = pool.score(items)
        empty = pool.score([])
    assert result.scores == [0.0 if i % 3 == 0 else 1.0 for i in range(24)]
    assert (result.timeouts, result.errors) == (0, 0)
    assert isinstance(empty, ScoreResult) and (empty.scores, empty.timeouts, empty.errors) == ([], 0, 0)


def wait_until_dead(pid: int) -> None:
    """Block until `pid` (a child of this process, so left a zombie until reaped) has exited."""
    status = Path(f"/proc/{pid}/status")
    give_up = time.monotonic() + 10.0
    while time.monotonic() < give_up:
        if not status.exists() or "State:\tZ" in status.read_text():
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} is still running")


@pytest.fixture(scope="module")
def scripted_pool() -> Iterator[RewardPool]:
    with RewardPool(SCRIPTED, num_workers=2, timeout_seconds=TIMEOUT) as pool:
        yield pool


def test_hanging_grader_is_cut_off() -> None:
    with RewardPool("tests.unit.graders_for_tests:hang", num_workers=1, timeout_seconds=0.5) as pool:
        start = time.monotonic()
        result = pool.score([("anything", "1")])
        elapsed = time.monotonic() - start
    assert result.scores == [0.0]
    assert (result.timeouts, result.errors) == (1, 0)
    assert elapsed < 10.0  # the grader sleeps for 600 s


def test_bad_items_score_zero_and_are_counted(scripted_pool: RewardPool) -> None:
    items = [("a", "a"), ("hang", "x"), ("b", "b"), ("boom", "x"), ("c", "no"), ("crash", "x"), ("d", "d")]
    result = scripted_pool.score(items)
    assert result.scores == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert (result.timeouts, result.errors) == (1, 2)
    assert result.seconds < TIMEOUT + 10.0


def test_pool_keeps_working_after_timeout_and_crash(scripted_pool: RewardPool) -> None:
    before = scripted_pool.worker_pids
    first = scripted_pool.score([("hang", "x"), ("crash", "x")])
    assert (first.timeouts, first.errors) == (1, 1)
    after = scripted_pool.worker_pids
    assert len(after) == 2 and not set(before) & set(after)
    items = [(str(i), str(i if i % 2 else -i)) for i in range(40)]
    result = scripted_pool.score(items)
    assert result.scores == [float(i % 2 == 1 or i == 0) for i in range(40)]
    assert (result.timeouts, result.errors) == (0, 0)


def test_raising_grader_keeps_its_worker(scripted_pool: RewardPool) -> None:
    before = scripted_pool.worker_pids
    result = scripted_pool.score([("boom", "x")] * 4)
    assert (result.scores, result.timeouts, result.errors) == ([0.0] * 4, 0, 4)
    assert scripted_pool.worker_pids == before


def test_worker_killed_while_idle_is_replaced(scripted_pool: RewardPool) -> None:
    victim = scripted_pool.worker_pids[0]
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    wait_until_dead(victim)
    result = scripted_pool.score([("a", "a"), ("b", "b"), ("c", "c")])
    assert (result.scores, result.timeouts, result.errors) == ([1.0] * 3, 0, 0)
    assert victim not in scripted_pool.worker_pids


def test_items_are_graded_concurrently(tmp_path: Path) -> None:
    """Each item waits up to 5 s for the other's file: graded one after the other, the first gets 0."""
    a, b = tmp_path / "a", tmp_path / "b"
    with RewardPool(SCRIPTED, num_workers=2, timeout_seconds=30.0) as pool:
        result = pool.score([(f"meet:{a}:{b}", "x"), (f"meet:{b}:{a}", "x")])
    assert result.scores == [1.0, 1.0]


def test_score_after_close_raises() -> None:
    pool = RewardPool(SCRIPTED, num_workers=1, timeout_seconds=TIMEOUT)
    pool.close()
    pool.close()
    with pytest.raises(RuntimeError, match="close"):
        pool.score([("a", "a")])
