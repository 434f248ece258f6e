"""Run metrics: the logger (jsonl, TensorBoard, progress bar), phase timers and accuracy plots."""

from megatron_speed.metrics.logger import MetricsLogger
from megatron_speed.metrics.plot import plot_accuracy_vs_time, plot_runs
from megatron_speed.metrics.timers import PhaseTimer

__all__ = ["MetricsLogger", "PhaseTimer", "plot_accuracy_vs_time", "plot_runs"]
