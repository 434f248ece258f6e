"""The metrics logger's sinks, the phase timer and the accuracy plots."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_speed.metrics import MetricsLogger, PhaseTimer, plot_accuracy_vs_time, plot_runs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_events(tensorboard_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_logger_writes_history_jsonl_and_tensorboard(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=True, progress_bar=False, total_steps=3) as logger:
        logger.log(1, {"reward/mean": 0.25, "loss": 1.5})
        logger.log(2, {"reward/mean": 0.5, "eval/accuracy": 0.7})
        logger.log_histogram(2, "pass_rate", [0.0, 0.25, 0.25, 1.0])
        assert logger.history == [(1, {"reward/mean": 0.25, "loss": 1.5}),
                                  (2, {"reward/mean": 0.5, "eval/accuracy": 0.7})]

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "reward/mean": 0.25, "loss": 1.5},
                     {"step": 2, "reward/mean": 0.5, "eval/accuracy": 0.7}]

    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    events = read_events(tmp_path / "tensorboard")
    rewards = events.Scalars("reward/mean")
    assert [e.step for e in rewards] == [1, 2]
    assert rewards[1].value == pytest.approx(0.5)
    assert events.Scalars("eval/accuracy")[0].value == pytest.approx(0.7)
    histogram = events.Histograms("pass_rate")[0]
    assert histogram.step == 2 and histogram.histogram_value.num == 4


def test_logger_without_tensorboard_writes_no_events(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, tensorboard=False, progress_bar=False, total_steps=2)
    logger.log(1, {"reward/mean": 1.0})
    logger.log_histogram(1, "pass_rate", [0.5])
    logger.close()
    logger.close()  # idempotent
    assert not (tmp_path / "tensorboard").exists()
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def test_logger_appends_to_an_existing_jsonl(tmp_path: Path) -> None:
    for step in (1, 2):
        with MetricsLogger(tmp_path, tensorboard=False, progress_bar=False, total_steps=2) as logger:
            logger.log(step, {"x": float(step)})
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_progress_bar_ticks_once_per_log_and_keeps_postfix(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=False, progress_bar=True, total_steps=5) as logger:
        logger.log(1, {"reward/mean": 0.123456, "eval/accuracy": 0.5})
        logger.log(2, {"reward/mean": 0.25})  # no accuracy this step: the last one stays shown
        logger.set_postfix(buffer=3)
        bar = logger._bar
        assert bar.n == 2
        assert bar.postfix is not None
        assert "reward=0.25" in bar.postfix and "acc=0.5" in bar.postfix and "buffer=3" in bar.postfix


def test_phase_timer_accumulates_and_resets() -> None:
    timer = PhaseTimer()
    with timer("generate"):
        time.sleep(0.02)
    with timer("generate"):
        time.sleep(0.02)
    with pytest.raises(RuntimeError), timer("train"):
        raise RuntimeError("a failing phase is still timed")
    times = timer.pop()
    assert set(times) == {"time/generate", "time/train"}
    assert times["time/generate"] >= 0.04
    assert times["time/train"] >= 0.0
    assert timer.pop() == {}


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000
    assert data[:8] == PNG_SIGNATURE


def test_plot_accuracy_vs_time_writes_png(tmp_path: Path) -> None:
    path = plot_accuracy_vs_time([(0.0, 0.3), (10.0, 0.45), (25.0, 0.6)], tmp_path / "plots" / "acc.png",
                                 title="toy RLOO", baseline=0.3)
    assert path == tmp_path / "plots" / "acc.png"
    assert_png(path)


def test_plot_accuracy_vs_time_handles_no_points_and_no_baseline(tmp_path: Path) -> None:
    assert_png(plot_accuracy_vs_time([], tmp_path / "empty.png", title="empty", baseline=None))


def test_plot_runs_writes_png(tmp_path: Path) -> None:
    runs = {"rloo": [(0.0, 0.3), (20.0, 0.5)], "speed-rloo": [(0.0, 0.3), (12.0, 0.55)], "empty": []}
    assert_png(plot_runs(runs, tmp_path / "runs.png", title="algorithms", target=0.5))
    assert_png(plot_runs(runs, tmp_path / "runs_no_target.png", title="algorithms", target=None))


def test_phase_timer_charges_queued_device_work_to_the_phase_that_queued_it() -> None:
    """A phase ends only when the device has finished its work: the synchronise at the boundary (here a
    stand-in that waits 50 ms, as a GPU finishing a queued backward would) is inside the phase."""
    import time

    queued: list[float] = []

    def synchronize() -> None:  # the device finishing whatever was queued
        while queued:
            time.sleep(queued.pop())

    timer = PhaseTimer(synchronize=synchronize)
    with timer("train"):
        queued.append(0.05)  # an asynchronous launch returns at once
    with timer("refit"):
        pass
    times = timer.pop()
    assert times["time/train"] >= 0.05 and times["time/refit"] < 0.05
