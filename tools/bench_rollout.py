"""Rollout engine on its own: generation tokens/s (ours vs plain `vllm.LLM.generate`), refit seconds,
and the memory a level-2 sleep frees.

Both generators get the same prompts, sampling parameters and per-request seeds, and the same engine
arguments (`rollout/compat.py::engine_kwargs`), each in its own subprocess so neither inherits the
other's memory. The refit streams a real `MegatronActor`'s export (bridge, TP gather) into the engine
in buckets of `--bucket-mb`, exactly as the loop does after each step:

    python tools/bench_rollout.py --shape qwen2.5-1.5b --out runs/bench_rollout.json   # on a GPU
    python tools/bench_rollout.py --shape tiny --prompts 8 --max-tokens 8 --kv-gib 0.25  # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_models import model_dir


def _rollout_cfg(args: argparse.Namespace):
    from megatron_speed.config.schema import RolloutConfig

    return RolloutConfig(n=args.n, temperature=1.0, max_new_tokens=args.max_tokens, kv_cache_gib=args.kv_gib,
                         gpu_memory_utilization=args.gpu_mem, enforce_eager=args.eager,
                         refit_bucket_mb=args.bucket_mb)


def _prompts(count: int) -> list:
    from megatron_speed.config.schema import ToyTaskConfig
    from megatron_speed.data.toy_task import make_problems

    return make_problems(ToyTaskConfig(eval_size=max(count, 1)), "eval")[:count]


def _free_gib() -> float:
    return torch.cuda.mem_get_info()[0] / 2**30 if torch.cuda.is_available() else float("nan")


def plain(args: argparse.Namespace, path: Path) -> dict[str, float]:
    """`vllm.LLM.generate` with our engine's arguments: the ceiling our wrapper is measured against."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    from megatron_speed.rollout import compat
    from megatron_speed.rollout.seeding import request_seed

    llm = LLM(model=str(path), **compat.engine_kwargs(_rollout_cfg(args), max_model_len=args.max_len, world_size=1,
                                                      seed=0))
    tokenizer = llm.get_tokenizer()
    ids = [{"prompt_token_ids": list(tokenizer.encode(p.prompt))} for p in _prompts(args.prompts)]
    times, tokens = [], 0
    for call in range(args.warmup + args.rounds):
        params = [SamplingParams(n=args.n, temperature=1.0, max_tokens=args.max_tokens, logprobs=0,
                                 seed=request_seed(0, 0, call, i)) for i in range(len(ids))]
        started = time.perf_counter()
        outs = llm.generate(ids, params, use_tqdm=False)
        if call >= args.warmup:
            times.append(time.perf_counter() - started)
            tokens += sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"generate_tokens_per_s": tokens / sum(times), "generate_s": statistics.median(times)}


def ours(args: argparse.Namespace, path: Path) -> dict[str, float]:
    """Our engine: generation, then sleep (memory freed), wake, refit from the actor, wake."""
    from megatron_speed.actor.actor import MegatronActor
    from megatron_speed.config.schema import AlgorithmConfig, ModelConfig, OptimConfig, ParallelConfig
    from megatron_speed.parallel import init_parallel
    from megatron_speed.records import SampleRequest
    from megatron_speed.rollout.engine import VLLMEngine

    init_parallel(ParallelConfig(), seed=0)
    engine = VLLMEngine(path, _rollout_cfg(args), max_model_len=args.max_len, seed=0)
    requests = [SampleRequest(prompt=p, n=args.n) for p in _prompts(args.prompts)]
    times, tokens = [], 0
    for call in range(args.warmup + args.rounds):
        started = time.perf_counter()
        groups = engine.generate(requests, policy_version=0)
        if call >= args.warmup:
            times.append(time.perf_counter() - started)
            tokens += sum(len(c.token_ids) for g in groups for c in g.completions)
    result = {"generate_tokens_per_s": tokens / sum(times), "generate_s": statistics.median(times),
              "engine_init_s": engine.init_seconds}

    free_awake = _free_gib()
    started = time.perf_counter()
    engine.sleep()
    result["sleep_s"] = time.perf_counter() - started
    result["sleep_freed_gib"] = _free_gib() - free_awake
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    actor = MegatronActor(path, model_cfg=ModelConfig(hf_path=str(path), params_dtype=dtype),
                          optim_cfg=OptimConfig(mini_batch_size=1, micro_batch_size=1),
                          algorithm_cfg=AlgorithmConfig(), temperature=1.0, horizon=args.max_tokens, total_steps=1)
    started = time.perf_counter()
    engine.wake_up(["weights"])
    result["wake_weights_s"] = time.perf_counter() - started
    refits = []
    for _ in range(args.refits):
        stats = engine.update_weights(actor.export_hf_weights())
        refits.append(stats.seconds)
    result.update(refit_s=statistics.median(refits), refit_gib=stats.bytes / 2**30, refit_buckets=stats.buckets,
                  refit_peak_bucket_mib=stats.peak_bucket_bytes / 2**20)
    started = time.perf_counter()
    engine.wake_up(["kv_cache"])
    result["wake_kv_s"] = time.perf_counter() - started
    engine.generate(requests[:1], policy_version=1)  # it still generates after the cycle
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2.5-1.5b")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--refits", type=int, default=3)
    parser.add_argument("--bucket-mb", type=float, default=512.0)
    parser.add_argument("--gpu-mem", type=float, default=0.5, help="rollout.gpu_memory_utilization")
    parser.add_argument("--kv-gib", type=float, default=0.0, help="rollout.kv_cache_gib (0 = from --gpu-mem)")
    parser.add_argument("--eager", action="store_true", help="rollout.enforce_eager (CUDA graphs off)")
    parser.add_argument("--cache", default="runs/bench_models")
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", choices=["plain", "ours"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    path = model_dir(args.shape, Path(args.cache))
    if args.one:
        print("RESULT " + json.dumps((plain if args.one == "plain" else ours)(args, path)), flush=True)
        return 0
    rows, failures = {}, {}
    for mode in ("plain", "ours"):
        proc = subprocess.run([sys.executable, __file__, "--one", mode, *sys.argv[1:]], capture_output=True,
                              text=True, env={**os.environ, "MASTER_PORT": "29591"})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            failures[mode] = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        else:
            rows[mode] = json.loads(lines[-1][len("RESULT "):])
    for mode, row in rows.items():
        print(f"{mode:6} " + "  ".join(f"{k} {v:.4g}" for k, v in row.items()))
    for mode, why in failures.items():
        print(f"{mode:6} failed: {why}")
    if len(rows) == 2:
        ratio = rows["ours"]["generate_tokens_per_s"] / rows["plain"]["generate_tokens_per_s"]
        print(f"ours / plain generation tokens/s: {100 * ratio:.1f} %")
    if args.out:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "device": device, "torch": torch.__version__,
            "args": {k: v for k, v in vars(args).items() if k != "one"}, "results": rows, "failures": failures},
            indent=2))
    return 0 if len(rows) == 2 else 1


if __name__ == "__main__":
    sys.exit(main())
