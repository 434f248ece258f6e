"""Colocated vs disaggregated (asynchronous) rollout on the toy, through `launch.py` on 2 ranks.

Runs the same recipe twice with `--executor local --nproc 2`: colocated (both ranks hold an actor
shard, DP=2, and an engine replica) and disaggregated (1 trainer rank + 1 engine rank,
`rollout.max_staleness`), then prints a table and writes JSON: steps, RL and total wall clock,
held-out accuracy (warm start -> final), achieved overlap, idle time on both sides, the staleness
of the trained samples, the groups the curriculum dropped as stale (buffered past
`rollout.max_staleness` or `curriculum.max_staleness`: generated, never trained), those that
trained without their screening samples (trimmed: older than `rollout.max_staleness`) and the
median per-phase seconds a projection needs.

    python tools/bench_async.py --steps 30 --out runs/bench_async.json

The toy model's warm start is built (or reused) under `<runs>/cache`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("time/generate", "time/score", "time/train", "time/refit", "async/trainer_idle_seconds",
          "async/engine_idle_seconds", "async/engine_busy_seconds", "async/overlap_seconds")


def run_arm(name: str, recipe: str, overrides: list[str], out_dir: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "launch.py"), recipe, f"run.output_dir={out_dir}", f"run.name={name}",
           *overrides, "--executor", "local", "--nproc", "2"]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.perf_counter() - started
    run_dir = out_dir / name
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] >= 1 and "time/train" in r]
    later = steps[2:] or steps  # the first steps include one-off warm-up (first generation call)
    median = {k: statistics.median(r.get(k, 0.0) for r in later) for k in PHASES}
    busy = sum(r.get("async/engine_busy_seconds", 0.0) for r in steps)
    overlap = sum(r.get("async/overlap_seconds", 0.0) for r in steps)
    ages = [r.get("async/staleness_mean", 0.0) for r in steps]
    last = steps[-1] if steps else {}  # the curriculum's counts are cumulative
    return {"arm": name, "steps": summary["steps"], "rl_seconds": summary["seconds"], "wall_seconds": wall,
            "warm_accuracy": summary["warm_start_accuracy"], "final_accuracy": summary["final_accuracy"],
            "overlap_fraction": overlap / busy if busy else 0.0, "staleness_mean": sum(ages) / max(len(ages), 1),
            "dropped_stale_groups": int(last.get("curriculum/dropped_stale_groups", 0.0)),
            "trimmed_stale_groups": int(last.get("curriculum/trimmed_stale_groups", 0.0)),
            "median_step_seconds": statistics.median(
                b["time/rl_seconds"] - a["time/rl_seconds"] for a, b in itertools.pairwise(later)) if len(later) > 1
            else 0.0, "median": median}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="toy_cpu_speed_js")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--staleness", type=int, default=1)
    parser.add_argument("--eval-prompts", type=int, default=512, help="held-out prompts (eval.max_prompts)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_async.json")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench_async")
    args = parser.parse_args()
    common = [f"run.steps={args.steps}", f"eval.every={args.steps}", f"eval.max_prompts={args.eval_prompts}",
              "metrics.progress_bar=false", "metrics.plot=false"]
    arms = [run_arm("colocated", args.recipe, common, args.runs),
            run_arm("disaggregated", args.recipe, [*common, "rollout.placement=disaggregated", "rollout.num_ranks=1",
                                                    f"rollout.max_staleness={args.staleness}"], args.runs)]
    print(f"{'arm':<14}{'steps':>6}{'RL s':>8}{'wall s':>8}{'acc warm->final':>18}{'overlap':>9}"
          f"{'age':>6}{'stale drops':>12}{'trims':>6}{'step s':>8}")
    for a in arms:
        print(f"{a['arm']:<14}{a['steps']:>6}{a['rl_seconds']:>8.1f}{a['wall_seconds']:>8.1f}"
              f"{a['warm_accuracy']:>9.3f}->{a['final_accuracy']:.3f}{a['overlap_fraction']:>9.2f}"
              f"{a['staleness_mean']:>6.2f}{a['dropped_stale_groups']:>12d}{a['trimmed_stale_groups']:>6d}"
              f"{a['median_step_seconds']:>8.2f}")
    print("median per-step seconds (steps 3+):")
    for a in arms:
        print(f"  {a['arm']:<14}" + "  ".join(f"{k.split('/')[-1]}={v:.2f}" for k, v in a["median"].items()))
    record = {"machine": f"{platform.processor() or platform.machine()}, {platform.node()}",
              "date": datetime.now(UTC).isoformat(timespec="minutes"), "recipe": args.recipe,
              "steps": args.steps, "max_staleness": args.staleness, "arms": arms}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
