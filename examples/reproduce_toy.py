"""Toy-scale reproduction of SPEED's speedup and the James-Stein baseline's variance reduction.

Arms: RLOO, SPEED-RLOO, JS, SPEED-JS (add DAPO, SPEED-DAPO with --arms). Every arm starts from the
same cached warm start and gets the same compute budget: `--seconds` of RL wall-clock (generation +
scoring + training + refit; evaluation excluded, as the SPEED paper's "pure training" hours) and at
most `--steps` RL steps. Each arm runs in its own process (`launch.py <recipe> ...`). Reported per
arm: time to reach `--target` held-out accuracy (linear interpolation between evaluations), final
accuracy, and for SPEED the speedup over its base (time_base / time_speed). Then the
policy-gradient variance of JS vs RLOO at group sizes 4, 8, 16 on the fixed warm-start policy
(`pg_variance.py`).

Run: python examples/reproduce_toy.py [--seconds 150] [--target 0.75] [--seeds 1]
Writes runs/reproduce_toy/results.json and runs/reproduce_toy/accuracy_vs_time.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_speed.metrics import plot_runs  # noqa: E402

ARMS = {"RLOO": "toy_cpu_rloo", "SPEED-RLOO": "toy_cpu_speed_rloo", "JS": "toy_cpu_js",
        "SPEED-JS": "toy_cpu_speed_js", "DAPO": "toy_cpu_dapo", "SPEED-DAPO": "toy_cpu_speed_dapo"}
PAIRS = {"SPEED-RLOO": "RLOO", "SPEED-JS": "JS", "SPEED-DAPO": "DAPO"}


def time_to_target(curve: list[list[float]], target: float) -> float | None:
    """First wall-clock time the held-out accuracy reaches `target`, interpolated; None if never."""
    for (t0, a0), (t1, a1) in itertools.pairwise(curve):
        if a0 >= target:
            return t0
        if a1 >= target:
            return t0 + (t1 - t0) * (target - a0) / (a1 - a0)
    return curve[-1][0] if curve and curve[-1][1] >= target else None


def run_arm(recipe: str, out: Path, *, seconds: float, steps: int, seed: int, every: int) -> dict:
    cmd = [sys.executable, str(ROOT / "launch.py"), recipe, f"run.output_dir={out}", f"run.name={recipe}",
           f"run.max_wall_seconds={seconds}", f"run.steps={steps}", f"run.seed={seed}",
           f"eval.every={every}", "metrics.progress_bar=false"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads((out / recipe / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=["RLOO", "SPEED-RLOO", "JS", "SPEED-JS"], choices=list(ARMS))
    parser.add_argument("--seconds", type=float, default=150.0, help="RL wall-clock budget per arm")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=5, help="evaluate every K steps")
    parser.add_argument("--target", type=float, default=0.75)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--variance-batches", type=int, default=24, help="0 skips the variance part")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "reproduce_toy")
    args = parser.parse_args()

    results: dict = {"target": args.target, "seconds": args.seconds, "arms": {}}
    curves = {}
    for seed in args.seeds:
        for arm in args.arms:
            s = run_arm(ARMS[arm], args.out / f"seed{seed}", seconds=args.seconds, steps=args.steps, seed=seed,
                        every=args.every)
            key = f"{arm} (seed {seed})"
            results["arms"][key] = {"time_to_target_s": time_to_target(s["accuracy_curve"], args.target),
                                    "warm_start": s["warm_start_accuracy"], "final": s["final_accuracy"],
                                    "steps": s["steps"], "rl_seconds": s["seconds"]}
            curves[key] = [tuple(p) for p in s["accuracy_curve"]]
    results["speedups"] = speedups(results["arms"], args.seeds)
    plot_runs(curves, args.out / "accuracy_vs_time.png", title="toy: held-out accuracy vs RL wall-clock",
              target=args.target)
    if args.variance_batches:
        from pg_variance import measure

        first = args.out / f"seed{args.seeds[0]}" / ARMS[args.arms[0]] / "summary.json"
        warm_start = Path(json.loads(first.read_text())["model_path"])  # the cached warm start all arms used
        results["pg_variance"] = measure(warm_start, group_sizes=[4, 8, 16], batches=args.variance_batches,
                                         prompts=32)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print_table(results)


def speedups(arms: dict, seeds: list[int]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for speed, base in PAIRS.items():
        for seed in seeds:
            s, b = arms.get(f"{speed} (seed {seed})"), arms.get(f"{base} (seed {seed})")
            if s and b:
                ts, tb = s["time_to_target_s"], b["time_to_target_s"]
                out[f"{speed} vs {base} (seed {seed})"] = tb / ts if ts and tb else None
    return out


def print_table(results: dict) -> None:
    print(f"\ntarget held-out accuracy {results['target']}, RL budget {results['seconds']} s per arm")
    print(f"{'arm':<24} {'time to target (s)':>18} {'warm start':>10} {'final':>7} {'steps':>6}")
    for key, r in results["arms"].items():
        t = f"{r['time_to_target_s']:.0f}" if r["time_to_target_s"] is not None else "never"
        print(f"{key:<24} {t:>18} {r['warm_start']:>10.3f} {r['final']:>7.3f} {r['steps']:>6}")
    for key, v in results["speedups"].items():
        print(f"speedup {key}: {v:.2f}x" if v else f"speedup {key}: n/a (an arm never reached the target)")
    for m, r in results.get("pg_variance", {}).items():
        print(f"group size {m}: tr Cov RLOO {r['rloo_trace_cov']:.3e}, JS {r['js_trace_cov']:.3e} "
              f"({r['js_reduction_percent']:.1f}% lower with JS)")


if __name__ == "__main__":
    main()
