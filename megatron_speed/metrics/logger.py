"""Where a run's numbers go: memory, a JSON-lines file, TensorBoard and a progress bar.

`MetricsLogger.log(step, scalars)` is called once per RL step (and may be called again for an
evaluation); every call is kept in `history`, appended as one JSON line
`{"step": s, "<name>": value, ...}` to `log_dir/metrics.jsonl` (opened in append mode, so a
resumed run extends the file), written as TensorBoard scalars under `log_dir/tensorboard` when
enabled, and advances the tqdm bar by one tick with a short postfix. The logger is meant for rank 0
only; it does no cross-rank reduction.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
from tqdm import tqdm

# Scalars shown in the bar's postfix by default: (metric name, short label).
DEFAULT_POSTFIX: tuple[tuple[str, str], ...] = (("reward/mean", "reward"), ("eval/accuracy", "acc"))


class MetricsLogger:
    """Logs scalar dicts per step to memory, `metrics.jsonl`, TensorBoard and a tqdm bar."""

    def __init__(self, log_dir: Path, *, tensorboard: bool, progress_bar: bool, total_steps: int,
                 postfix: Sequence[tuple[str, str]] = DEFAULT_POSTFIX, purge_step: int | None = None) -> None:
        """`purge_step`: a resumed run's first step; TensorBoard hides what an interrupted run logged
        from that step on (the resumed run logs those steps again)."""
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.history: list[tuple[int, dict[str, float]]] = []
        self._postfix_names = tuple(postfix)
        self._postfix: dict[str, str] = {}
        self._jsonl = (self.log_dir / "metrics.jsonl").open("a", encoding="utf-8")
        self._writer: Any = None
        if tensorboard:
            # Imported here so a run with TensorBoard off never loads it.
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.tensorboard_dir), purge_step=purge_step)
        self._bar = tqdm(total=total_steps, disable=not progress_bar, dynamic_ncols=True, unit="step")

    @property
    def tensorboard_dir(self) -> Path:
        return self.log_dir / "tensorboard"

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        """Record `scalars` for `step` everywhere and advance the progress bar one tick."""
        values = {name: float(value) for name, value in scalars.items()}
        self.history.append((step, values))
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(name, value, global_step=step)
        self._update_postfix(values)
        self._bar.update(1)

    def log_histogram(self, step: int, name: str, values: Sequence[float]) -> None:
        """A TensorBoard histogram (e.g. per-prompt pass rates); no-op without TensorBoard or values."""
        if self._writer is None or len(values) == 0:
            return
        self._writer.add_histogram(name, np.asarray(values, dtype=np.float64), global_step=step)

    def set_postfix(self, **values: float | str) -> None:
        """Show extra `label=value` pairs in the bar's postfix (kept until overwritten)."""
        for label, value in values.items():
            self._postfix[label] = _short(value)
        self._bar.set_postfix(self._postfix, refresh=False)

    def _update_postfix(self, values: Mapping[str, float]) -> None:
        """Refresh the postfix from the configured metrics; a metric not logged now keeps its last value
        (held-out accuracy is only measured every few steps)."""
        shown = {label: values[name] for name, label in self._postfix_names if name in values}
        if shown:
            self.set_postfix(**shown)

    def flush(self) -> None:
        self._jsonl.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close every sink; safe to call twice."""
        if not self._jsonl.closed:
            self._jsonl.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._bar.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _short(value: float | str) -> str:
    """A compact rendering for the progress bar: 3 significant digits for numbers."""
    if isinstance(value, str):
        return value
    return f"{value:.3g}" if math.isfinite(value) else str(value)


__all__ = ["DEFAULT_POSTFIX", "MetricsLogger"]
