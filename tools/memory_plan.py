"""Per-GPU memory plan of a recipe: weights, gradients, optimizer shards, activations, logits, engine
weights and KV cache, by phase (train with the engine asleep, refit, generate), and a verdict. The
activations at the micro-batch token budget and the train phase are also given both without and with
recompute (`model.recompute=none` / `full`), whichever the recipe sets.

    python tools/memory_plan.py speed_rloo__qwen2.5-math-7b__dapo17k --gpus 4 --gpu-memory-gib 80
    python tools/memory_plan.py jspo__qwen3-4b-base__dapo17k optim.micro_batch_tokens=8192 --gpu-memory-gib 141

Prints a table and one JSON object (`--json PATH` also writes it). Figures are ESTIMATES from arithmetic
(`megatron_speed/memory/plan.py`: the weight, gradient, optimizer and KV parts are checked against
megatron-core and vLLM on CPU; activations, logits and workspaces are not measured) — check them against
real peaks on a GPU host. When the plan does not fit, the verdict names the override that makes it fit.
The model's dimensions come from `model.hf_path`'s config.json when that folder exists, else from the
published configs of the papers' models (`KNOWN_SHAPES`, matched by folder name).
Exit status: 0 fits, 1 does not fit, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_speed.config import ConfigError
from megatron_speed.memory import GIB, KNOWN_SHAPES, ModelShape, Plan, PlanInputs, plan, suggest
from megatron_speed.recipes import load_recipe


def model_shape(hf_path: str) -> ModelShape:
    path = Path(hf_path)
    if (path / "config.json").exists():
        from transformers import AutoConfig

        return ModelShape.from_hf(AutoConfig.from_pretrained(path), name=path.name)
    if path.name in KNOWN_SHAPES:
        return KNOWN_SHAPES[path.name]
    raise ValueError(f"model.hf_path={hf_path!r} has no config.json here and is not one of the known models "
                     f"({', '.join(KNOWN_SHAPES)}); point model.hf_path at a local HF folder")


def table(result: Plan, shape: ModelShape) -> str:
    i = result.inputs
    lines = [f"model {shape.name}: {shape.total_params() / 1e9:.2f} B parameters; {i.gpus} GPUs x "
             f"{i.gpu_bytes / GIB:.0f} GiB; actor TP {i.tp} x PP {i.pp} x DP {i.dp}, rollout TP {i.rollout_tp}; "
             f"micro-batch {i.micro_batch_tokens} tokens, recompute {i.recompute}, distributed optimizer "
             f"{'on' if i.distributed_optimizer else 'off'}",
             "", "| per GPU (estimate) | GiB |", "|---|---|"]
    lines += [f"| {name} | {value / GIB:.2f} |" for name, value in result.items.items()]
    lines += ["", "| phase | GiB | fits |", "|---|---|---|"]
    lines += [f"| {name} | {value / GIB:.2f} | {'yes' if value <= i.gpu_bytes else 'NO'} |"
              for name, value in result.phases.items()]
    lines.append(f"\nKV cache: {result.kv_tokens} tokens ({result.kv_bytes_per_token} bytes each); one generation "
                 f"call has {i.concurrent_sequences} sequences of up to {i.max_model_len} tokens")
    return "\n".join(lines)


ACTIVATIONS = "activations (one micro-batch per stage ahead)"
TRAIN = "train (engine asleep)"


def by_recompute(result: Plan, shape: ModelShape) -> dict[str, dict[str, int]]:
    """Activations and the train phase with `model.recompute` none and full, everything else as planned."""
    out = {}
    for mode in ("none", "full"):
        other = plan(shape, dataclasses.replace(result.inputs, recompute=mode))
        out[mode] = {"activations": other.items[ACTIVATIONS], "train": other.phases[TRAIN]}
    return out


def recompute_table(result: Plan, shape: ModelShape) -> str:
    i = result.inputs
    lines = [f"| activations at the {i.micro_batch_tokens}-token micro-batch budget | activations GiB | "
             f"{TRAIN} GiB |", "|---|---|---|"]
    for mode, figures in by_recompute(result, shape).items():
        configured = " (configured)" if mode == i.recompute else ""
        lines.append(f"| model.recompute={mode}{configured} | {figures['activations'] / GIB:.2f} | "
                     f"{figures['train'] / GIB:.2f} |")
    if i.recompute not in ("none", "full"):
        lines.append(f"\n(model.recompute={i.recompute} is planned as none: its savings are not modelled)")
    return "\n".join(lines)


def verdict(result: Plan, shape: ModelShape) -> tuple[str, list[str] | None]:
    if result.fits:
        return "fits", []
    fix = suggest(shape, result.inputs)
    if fix is None:
        return f"does not fit ({'; '.join(result.problems())}); no override tried fits: use more GPUs", None
    return f"does not fit ({'; '.join(result.problems())}); fits with: {' '.join(fix)}", fix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe", help="recipe name (launch.py --list)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.recompute=full")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (80 H100, 141 H200)")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs of the job (actor TP x PP x DP)")
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="longest prompt (max_model_len = it + "
                        "rollout.max_new_tokens)")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    try:
        cfg = load_recipe(args.recipe, args.overrides)
        shape = model_shape(cfg.model.hf_path)
    except (ConfigError, ValueError, KeyError) as err:
        print(f"memory_plan: {err}", file=sys.stderr)
        return 2
    inputs = PlanInputs.from_config(cfg, gpus=args.gpus, gpu_gib=args.gpu_memory_gib, prompt_tokens=args.prompt_tokens)
    if args.gpus % (inputs.tp * inputs.pp):
        print(f"memory_plan: --gpus {args.gpus} is not a multiple of TP x PP = {inputs.tp * inputs.pp}",
              file=sys.stderr)
        return 2
    result = plan(shape, inputs)
    text, fix = verdict(result, shape)
    print(table(result, shape))
    print("\n" + recompute_table(result, shape))
    print(f"\nverdict (estimate): {text}")
    payload = {"recipe": args.recipe, "overrides": args.overrides, "model": asdict(shape),
               "params": shape.total_params(), "inputs": asdict(inputs), "bytes": result.items,
               "phases_bytes": result.phases,
               "by_recompute_bytes": by_recompute(result, shape), "kv_tokens": result.kv_tokens, "fits": result.fits,
               "problems": result.problems(), "fix": fix, "estimate": True}
    print(json.dumps(payload))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0 if result.fits else 1


if __name__ == "__main__":
    raise SystemExit(main())
