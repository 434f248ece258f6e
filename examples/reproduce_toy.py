"""Toy-scale answer to "when does SPEED pay off, and why?": both update modes, several seeds, two pools.

Arms (each its own process, `launch.py <recipe> ...`, from the same cached warm start of its pool):
  RLOO, JS                          baselines: 8 samples per prompt, 32 prompts, 1 update per RL step
  SPEED-RLOO / SPEED-JS upstream    screen 4 + continue 4; mini-batch = prompts x n_init, as verl
                                    counts it (2 updates per RL step here), LR schedule in RL steps
  SPEED-RLOO / SPEED-JS controlled  the same curriculum at the baselines' 1 update per RL step
So "upstream vs controlled" isolates the extra updates and "controlled vs baseline" the curriculum.

Pools: `narrow` is the embedded default (1-4 digit sums: few prompts at pass rate 0 or 1 after the
warm start); `wide` widens the operands to 1-6 digits, so that, as on real math sets, a large share
of prompts is all-wrong (many carries) or all-correct (short sums) for the warm start.

Every arm gets `--seconds` of RL wall-clock (generation + scoring + training + refit; evaluation and
saving excluded, as the SPEED paper's "pure training" hours) and at most `--steps` RL steps.
Reported per arm, mean +- std over seeds: time to the pool's target held-out accuracy (per-set
metric, linear interpolation between evaluations; seeds that never reach it are counted), final
accuracy, RL steps, optimizer updates, generated tokens, the share of zero-variance groups in the
baselines' batches, and SPEED's screening overhead (share of generated samples spent on prompts it
rejected). Then speed-ups of SPEED over its base per mode.

Run: python examples/reproduce_toy.py [--pools narrow wide] [--seeds 1 2 3] [--seconds 45] [--every 5]
     [--targets narrow=0.72 wide=0.16]   (the defaults: what BENCHMARKS.md's issue-11 section used)
Writes <out>/results.json and <out>/accuracy_vs_time_<pool>.png; prints the tables.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_speed.metrics import plot_runs  # noqa: E402
from megatron_speed.metrics.targets import first_reach  # noqa: E402
from megatron_speed.recipes import load_recipe  # noqa: E402
from megatron_speed.recipes.papers import upstream_mini_batch  # noqa: E402

# arm -> (recipe, mode); mode "upstream" makes SPEED's updates per RL step what verl's counting gives.
ARMS = {"RLOO": ("toy_cpu_rloo", "base"), "JS": ("toy_cpu_js", "base"),
        "SPEED-RLOO upstream": ("toy_cpu_speed_rloo", "upstream"),
        "SPEED-RLOO controlled": ("toy_cpu_speed_rloo", "controlled"),
        "SPEED-JS upstream": ("toy_cpu_speed_js", "upstream"),
        "SPEED-JS controlled": ("toy_cpu_speed_js", "controlled"),
        "DAPO": ("toy_cpu_dapo", "base"), "SPEED-DAPO upstream": ("toy_cpu_speed_dapo", "upstream"),
        "SPEED-DAPO controlled": ("toy_cpu_speed_dapo", "controlled")}
BASE_OF = {"SPEED-RLOO": "RLOO", "SPEED-JS": "JS", "SPEED-DAPO": "DAPO"}
# pool -> (overrides, default target held-out accuracy: the targets BENCHMARKS.md's issue-11 tables use)
POOLS = {"narrow": ((), 0.72), "wide": (("data.toy.max_digits=6",), 0.16)}


def arm_overrides(arm: str, pool: str) -> list[str]:
    recipe, mode = ARMS[arm]
    extra = list(POOLS[pool][0])
    if mode == "upstream":
        cfg = load_recipe(recipe, extra)
        mini = upstream_mini_batch(cfg.curriculum.prompts_per_step, cfg.curriculum.n_init)
        extra += [f"optim.mini_batch_size={mini}", "optim.lr_schedule_unit=rl_step"]
    return extra


def run_arm(arm: str, pool: str, out: Path, *, seconds: float, steps: int, seed: int, every: int) -> Path:
    recipe = ARMS[arm][0]
    name = arm.replace(" ", "_")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "cache").exists():  # one warm start per pool, shared by every seed and arm (it is seeded)
        (out / "cache").symlink_to(ROOT / "runs" / "cache", target_is_directory=True)
    cmd = [sys.executable, str(ROOT / "launch.py"), recipe, f"run.output_dir={out}", f"run.name={name}",
           f"run.max_wall_seconds={seconds}", f"run.steps={steps}", f"run.seed={seed}", f"eval.every={every}",
           "metrics.progress_bar=false", "metrics.tensorboard=false", *arm_overrides(arm, pool)]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out / name


def measure(run_dir: Path, target: float) -> dict[str, Any]:
    """One finished run's figures from its summary.json, metrics.jsonl and resolved config.json."""
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = json.loads((run_dir / "config.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if r["step"] > 0 and "rollout/generated_tokens" in r]
    cur = cfg["curriculum"]
    per_prompt = cur["n_init"] + cur["n_continue"] if cur["name"] == "speed" else cfg["rollout"]["n"]
    updates_per_step = cur["prompts_per_step"] * per_prompt // cfg["optim"]["mini_batch_size"]
    (set_name, curve), = summary["set_curves"].items()  # the toy has one held-out set
    zero_var = [(r["rollout/all_correct_groups"] + r["rollout/all_wrong_groups"]) / cur["prompts_per_step"]
                for r in steps_rows]
    last = steps_rows[-1] if steps_rows else {}
    generated = last.get("curriculum/samples_generated")
    return {"time_to_target_s": first_reach(curve, target),
            "metric": f"{set_name} {summary['set_metrics'][set_name]}",
            "warm_start": summary["warm_start_accuracy"], "final": summary["final_accuracy"],
            "steps": summary["steps"], "updates": summary["steps"] * updates_per_step,
            "rl_seconds": summary["seconds"],
            "generated_tokens": sum(r["rollout/generated_tokens"] for r in steps_rows),
            "zero_variance_share": statistics.fmean(zero_var) if zero_var and cur["name"] == "none" else None,
            "screening_overhead": (last["curriculum/samples_rejected"] / generated) if generated else None,
            "curve": curve}


def mean_std(values: list[float]) -> tuple[float, float] | None:
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean +- std over seeds; time to target over the seeds that reached it (and how many did)."""
    reached = [r["time_to_target_s"] for r in runs if r["time_to_target_s"] is not None]
    out: dict[str, Any] = {"seeds": len(runs), "reached": len(reached), "time_to_target_s": mean_std(reached)}
    for key in ("final", "steps", "updates", "generated_tokens", "zero_variance_share", "screening_overhead"):
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = mean_std(values)
    return out


def speedups(table: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """time(base) / time(SPEED arm), means over the seeds that reached the target."""
    out: dict[str, float | None] = {}
    for arm, agg in table.items():
        base = BASE_OF.get(arm.split(" ")[0])
        if base and base in table:
            ts, tb = agg["time_to_target_s"], table[base]["time_to_target_s"]
            out[f"{arm} vs {base}"] = tb[0] / ts[0] if ts and tb else None
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=["RLOO", "SPEED-RLOO upstream", "SPEED-RLOO controlled", "JS",
                                                     "SPEED-JS upstream", "SPEED-JS controlled"], choices=list(ARMS))
    parser.add_argument("--pools", nargs="+", default=list(POOLS), choices=list(POOLS))
    parser.add_argument("--targets", nargs="*", default=[], help="POOL=ACC, e.g. wide=0.5 (default per pool)")
    parser.add_argument("--seconds", type=float, default=45.0, help="RL wall-clock budget per arm")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=5, help="evaluate every K steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--variance-batches", type=int, default=0, help="JS vs RLOO gradient variance; 0 skips")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "reproduce_toy")
    parser.add_argument("--analyse-only", action="store_true", help="re-measure finished runs under --out (e.g. "
                        "for another --targets) without training")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    targets = {pool: POOLS[pool][1] for pool in POOLS} | {k: float(v) for k, v in (t.split("=") for t in args.targets)}

    results: dict[str, Any] = {"seconds": args.seconds, "seeds": args.seeds, "pools": {}}
    for pool in args.pools:
        runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in args.arms}
        for seed, arm in itertools.product(args.seeds, args.arms):  # seeds outermost: arms interleave in time
            out = args.out / pool / f"seed{seed}"
            run_dir = out / arm.replace(" ", "_") if args.analyse_only else run_arm(
                arm, pool, out, seconds=args.seconds, steps=args.steps, seed=seed, every=args.every)
            runs[arm].append(measure(run_dir, targets[pool]))
        table = {arm: aggregate(r) for arm, r in runs.items()}
        results["pools"][pool] = {"target": targets[pool], "arms": table, "speedups": speedups(table), "runs": runs}
        plot_runs({f"{arm} s{seed}": [tuple(p) for p in r["curve"]] for arm, rs in runs.items()
                   for seed, r in zip(args.seeds, rs)}, args.out / f"accuracy_vs_time_{pool}.png",
                  title=f"toy ({pool} pool): held-out accuracy vs RL seconds", target=targets[pool])
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        print_table(pool, results["pools"][pool])
    if args.variance_batches:
        from pg_variance import measure as pg_measure

        first = next((args.out / args.pools[0] / f"seed{args.seeds[0]}").glob("*/summary.json"))
        warm_start = Path(json.loads(first.read_text())["model_path"])
        results["pg_variance"] = pg_measure(warm_start, group_sizes=[4, 8, 16], batches=args.variance_batches,
                                            prompts=32)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))


def _fmt(ms: tuple[float, float] | None, spec: str = ".0f", scale: float = 1.0) -> str:
    return "-" if ms is None else f"{ms[0] * scale:{spec}} +- {ms[1] * scale:{spec}}"


def print_table(pool: str, res: dict[str, Any]) -> None:
    print(f"\npool {pool}: target held-out accuracy {res['target']}")
    print("| arm | time to target (s) | reached | final accuracy | RL steps | updates | generated tokens (k) "
          "| zero-variance groups | screening overhead |")
    print("|---|---|---|---|---|---|---|---|---|")
    for arm, a in res["arms"].items():
        print(f"| {arm} | {_fmt(a['time_to_target_s'])} | {a['reached']}/{a['seeds']} | {_fmt(a['final'], '.3f')} "
              f"| {_fmt(a['steps'])} | {_fmt(a['updates'])} | {_fmt(a['generated_tokens'], '.0f', 1e-3)} "
              f"| {_fmt(a['zero_variance_share'], '.0%')} | {_fmt(a['screening_overhead'], '.0%')} |")
    for key, v in res["speedups"].items():
        print(f"speed-up {key}: {v:.2f}x" if v else f"speed-up {key}: n/a (an arm never reached the target)")


if __name__ == "__main__":
    main()
