"""Time to target: when a held-out curve first reaches a target accuracy, in RL seconds and RL steps.

This is the SPEED paper's headline measure ("pure training" hours until a set's accuracy first
reaches its target). A curve is one point per evaluation, in evaluation order. The crossing is
linearly interpolated between the two evaluations that straddle the target, and the same fraction
gives both the RL second and the (fractional) RL step; a curve already at the target at its first
evaluation reaches it there; one that never does has no time (None). Upstream's
`plot/analyze_thresholds.py` reads the first evaluation at or above the target instead, which is
later by up to one evaluation interval; with evaluations every 25 steps this matters little beside
the seed-to-seed spread, and interpolation makes the toy's short runs comparable.

A target names one set (`math500`) or several joined by `+` (`aime24+aime25`): the latter is the
unweighted mean of those sets' curves, as the paper's "AIME avg(24,25)". Pure functions of plain
values; the trainer passes its per-set curves and `eval.targets`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from megatron_speed.config.base import ConfigError

Curve = Sequence[Sequence[float]]  # (x, value) per evaluation, x increasing


def crossing(values: Sequence[float], target: float) -> tuple[int, float] | None:
    """(i, f): `values` first reaches `target` the fraction f of the way from evaluation i to i + 1
    (f = 0: at evaluation i itself); None if it never does."""
    for i, value in enumerate(values):
        if value >= target:
            if i == 0:
                return 0, 0.0
            before = values[i - 1]
            return i - 1, (target - before) / (value - before)
    return None


def _at(xs: Sequence[float], where: tuple[int, float]) -> float:
    i, f = where
    return float(xs[i]) if f == 0.0 else float(xs[i] + f * (xs[i + 1] - xs[i]))


def first_reach(curve: Curve, target: float) -> float | None:
    """The x (e.g. RL seconds) at which a (x, value) curve first reaches `target`, interpolated."""
    where = crossing([float(v) for _, v in curve], target)
    return None if where is None else _at([float(x) for x, _ in curve], where)


def combined_curve(set_curves: Mapping[str, Curve], name: str) -> list[tuple[float, float]]:
    """The curve a target name stands for: one set's, or the pointwise mean of `a+b+...`'s (every
    evaluation scores every set, so their points share the evaluation times)."""
    parts = name.split("+")
    missing = [p for p in parts if p not in set_curves]
    if missing:
        raise KeyError(f"time-to-target {name!r}: no held-out set {missing} (sets: {sorted(set_curves)})")
    curves = [set_curves[p] for p in parts]
    if len({len(c) for c in curves}) != 1:
        raise ValueError(f"time-to-target {name!r}: the sets have different numbers of evaluations")
    return [(float(points[0][0]), sum(float(v) for _, v in points) / len(points)) for points in zip(*curves)]


def time_to_target(set_curves: Mapping[str, Curve], eval_steps: Sequence[int],
                   targets: Mapping[str, float]) -> dict[str, dict[str, float | None]]:
    """{target name: {"target", "seconds", "step"}} for each entry of `targets`.

    `set_curves` are (RL seconds, headline metric) per evaluation, the headline being avg@k for a set
    sampled k >= 1 times and greedy accuracy otherwise (`SetResult.headline`); `eval_steps` is the RL
    step of each evaluation. "step" is None when the run never reached the target or when the steps do
    not line up with the curve (a run resumed from a checkpoint written before they were recorded)."""
    out: dict[str, dict[str, float | None]] = {}
    for name, target in targets.items():
        curve = combined_curve(set_curves, name)
        where = crossing([v for _, v in curve], target)
        steps_known = len(eval_steps) == len(curve)
        out[name] = {"target": target,
                     "seconds": None if where is None else _at([t for t, _ in curve], where),
                     "step": None if where is None or not steps_known else _at(list(eval_steps), where)}
    return out


def check_target_sets(targets: Mapping[str, float], set_names: Collection[str]) -> None:
    """At setup, once the held-out sets are known: every set a target names must be evaluated."""
    for name in targets:
        missing = [p for p in name.split("+") if p not in set_names]
        if missing:
            raise ConfigError("eval.targets", name, f"names held-out set(s) {missing} that the run does not evaluate",
                              f"use the sets' source names ({', '.join(sorted(set_names))}), or add the set "
                              "to eval.files")
