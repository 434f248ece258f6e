"""Actor training throughput: tokens/s, MFU and peak memory of `MegatronActor.train_step`.

The model is a random HF model of a named shape (default: Qwen2.5-1.5B) written once to a cache
folder, loaded by the real actor (bridge, megatron-core GPTModel, megatron optimizer) and trained
with the real RL loss on random full-length sequences. Each attention backend runs in its own
subprocess so peak-memory figures do not leak between them:

    python tools/bench_actor.py --out runs/bench_actor.json                  # H100: local vs sdpa (+ te)
    python tools/bench_actor.py --shape tiny --seq 64 --backends local sdpa  # CPU smoke run
    # padded vs packed on RL-shaped lengths (long tail to max_new_tokens), optionally with CP:
    python tools/bench_actor.py --lengths longtail --batching fixed dynamic packed --backends sdpa \
        --micro-batch-tokens 16384 --seq 8192 --micro-batch 4 --micro-batches 8 [--cp 2]

Batching (`--batching`): "fixed" = `--micro-batch` rows padded to the batch's longest row (the
default layout), "dynamic" = rows trimmed per micro-batch within `--micro-batch-tokens`, "packed" =
sequence packing within `--micro-batch-tokens` (THD). `--lengths longtail` draws prompt lengths
uniform in 3-10 % of `--seq` and response lengths lognormal around a quarter of the response cap,
truncated at the cap (about 4 % of responses hit it), as RL traces are. With `--cp N` every case
runs under torchrun on N ranks with `parallel.context_parallel_size=N` (packed only).

Tokens/s counts the tokens the loss needs (prompt + response, not padding); `computed/s` counts
every position the model ran on. `pad %` is the actor's own `actor/padding_fraction`. `CPU s` is
the process's CPU time per step (every thread; rank 0 under torchrun), the steadier measure on a
shared CPU machine where wall time depends on what else runs.

MFU counts model FLOPs only (recomputation is not credited): per trained token
6 * (matmul parameters incl. the LM head) + 6 * layers * seq * heads * head_dim (causal attention,
forward + backward, half of the S x S products; with variable lengths seq is the token-weighted mean
length sum(L^2)/sum(L)), divided by the card's dense bf16 peak (`--peak-tflops`, 989 for an H100 SXM).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_models import SHAPES, model_dir


@dataclass(frozen=True)
class Result:
    shape: str
    backend: str
    seq: int
    micro_batch: int
    recompute: str
    tokens_per_s: float
    step_s: float
    mfu_percent: float
    peak_gib: float
    loss: float
    batching: str = "fixed"
    lengths: str = "full"
    cp: int = 1
    padding_fraction: float = 0.0
    computed_tokens_per_s: float = 0.0
    cpu_step_s: float = 0.0  # process CPU time per step (all threads): stable on a shared machine


def flops_per_token(hf: dict[str, int], seq: int) -> float:
    d, layers, heads, kv = hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"], \
        hf["num_key_value_heads"]
    head_dim = d // heads
    attn = d * head_dim * (heads + 2 * kv) + heads * head_dim * d
    mlp = 3 * d * hf["intermediate_size"]
    matmul_params = layers * (attn + mlp) + d * hf["vocab_size"]
    return 6.0 * matmul_params + 6.0 * layers * seq * heads * head_dim


def batch_lengths(args: argparse.Namespace, rows: int) -> list[tuple[int, int]]:
    """(prompt, response) lengths per row: full-length rows, or the RL-shaped long tail."""
    if args.lengths == "full":
        return [(args.seq // 8, args.seq - args.seq // 8)] * rows
    gen = torch.Generator().manual_seed(1)
    prompts = (args.seq * (0.03 + 0.07 * torch.rand(rows, generator=gen))).long().clamp(min=2)
    cap = args.seq - prompts.max()
    responses = (cap / 4 * torch.exp(0.8 * torch.randn(rows, generator=gen))).long().clamp(1, int(cap))
    return list(zip(prompts.tolist(), responses.tolist()))


def make_batch(args: argparse.Namespace, rows: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Right-padded tokens, response mask, old log-probs and advantages for `rows` rows."""
    lengths = batch_lengths(args, rows)
    width = max(p + r for p, r in lengths)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, SHAPES[args.shape]["vocab_size"], (rows, width), generator=gen)
    mask = torch.zeros(rows, width - 1)
    for i, (p, r) in enumerate(lengths):
        tokens[i, p + r:] = 0
        mask[i, p - 1:p - 1 + r] = 1.0  # a prompt that is not trained on, as in RL
    old = -torch.rand(rows, width - 1, generator=gen) * 5 * mask
    adv = torch.randn(rows, 1, generator=gen).expand(rows, width - 1) * mask
    return tuple(t.to(device) for t in (tokens, mask, old, adv))


def run_one(args: argparse.Namespace, backend: str, batching: str) -> Result:
    from megatron_speed.actor.actor import MegatronActor
    from megatron_speed.config.schema import AlgorithmConfig, ModelConfig, OptimConfig, ParallelConfig
    from megatron_speed.parallel import init_parallel

    path = model_dir(args.shape, Path(args.cache), max_positions=max(args.seq, 4096))
    init_parallel(ParallelConfig(context_parallel_size=args.cp), seed=0)
    on_gpu = torch.cuda.is_available()
    rows = args.micro_batch * args.micro_batches
    budget = args.micro_batch_tokens if batching != "fixed" else 0
    actor = MegatronActor(path, model_cfg=ModelConfig(hf_path=str(path), params_dtype="bfloat16" if on_gpu else
                                                      "float32", attention_backend=backend,
                                                      recompute=args.recompute),
                          optim_cfg=OptimConfig(lr=1e-6, min_lr=1e-6, mini_batch_size=rows,
                                                micro_batch_size=args.micro_batch, micro_batch_tokens=budget,
                                                pack_sequences=batching == "packed"),
                          algorithm_cfg=AlgorithmConfig(), temperature=1.0, horizon=args.seq,
                          total_steps=args.steps + args.warmup)
    device = torch.device("cuda") if on_gpu else torch.device("cpu")
    tokens, mask, old, adv = make_batch(args, rows, device)
    lengths = [p + r for p, r in batch_lengths(args, rows)]

    def step() -> dict[str, float]:
        stats = actor.train_step(tokens, mask, old, adv)
        if on_gpu:
            torch.cuda.synchronize()
        return stats

    for _ in range(args.warmup):
        step()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        stats = step()
    seconds = (time.perf_counter() - started) / args.steps
    cpu_seconds = (time.process_time() - cpu_started) / args.steps
    tokens_per_s = sum(lengths) / seconds
    mean_len = sum(n * n for n in lengths) / sum(lengths)
    mfu = 100.0 * tokens_per_s * flops_per_token(SHAPES[args.shape], int(mean_len)) / (args.peak_tflops * 1e12)
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else float("nan")
    pad = stats["actor/padding_fraction"]
    return Result(args.shape, backend, args.seq, args.micro_batch, args.recompute, tokens_per_s, seconds, mfu,
                  peak, stats["loss"], batching=batching, lengths=args.lengths, cp=args.cp, padding_fraction=pad,
                  computed_tokens_per_s=tokens_per_s / max(1.0 - pad, 1e-9), cpu_step_s=cpu_seconds)


def _launch(args: argparse.Namespace, backend: str, batching: str) -> tuple[Result | None, str]:
    """One case in its own process (torchrun over --cp ranks when CP > 1); rank 0 prints the result."""
    one = [__file__, "--one", f"{backend}:{batching}", *sys.argv[1:]]
    if args.cp > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.cp), "--master-port",
               "29591", *one]
    else:
        cmd = [sys.executable, *one]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MASTER_PORT": "29590"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return None, (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return Result(**json.loads(lines[-1][len("RESULT "):])), ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--micro-batches", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    parser.add_argument("--backends", nargs="+", default=["local", "sdpa", "te"])
    parser.add_argument("--batching", nargs="+", default=["fixed"], choices=["fixed", "dynamic", "packed"])
    parser.add_argument("--lengths", default="full", choices=["full", "longtail"])
    parser.add_argument("--micro-batch-tokens", type=int, default=16384, help="budget for dynamic and packed")
    parser.add_argument("--cp", type=int, default=1, help="context-parallel ranks (torchrun; packed only)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--cache", default="runs/bench_models")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one backend, print JSON
    args = parser.parse_args()
    if args.one:
        backend, batching = args.one.split(":")
        result = run_one(args, backend, batching)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(asdict(result)), flush=True)
        return 0
    results, failures = [], {}
    model_dir(args.shape, Path(args.cache), max_positions=max(args.seq, 4096))  # once, before the subprocesses
    for backend in args.backends:
        for batching in args.batching:
            result, why = _launch(args, backend, batching)
            if result is None:
                failures[f"{backend}:{batching}"] = why
            else:
                results.append(result)
    print(f"{'backend':8} {'batching':8} {'cp':>2} {'seq':>6} {'mb':>3} {'pad %':>6} {'tokens/s':>10} "
          f"{'computed/s':>10} {'step s':>8} {'CPU s':>7} {'MFU %':>6} {'peak GiB':>9}")
    for r in results:
        print(f"{r.backend:8} {r.batching:8} {r.cp:>2} {r.seq:>6} {r.micro_batch:>3} {100 * r.padding_fraction:>6.1f} "
              f"{r.tokens_per_s:>10.0f} {r.computed_tokens_per_s:>10.0f} {r.step_s:>8.3f} {r.cpu_step_s:>7.2f} "
              f"{r.mfu_percent:>6.1f} "
              f"{r.peak_gib:>9.1f}")
    for backend, why in failures.items():
        print(f"{backend:8} failed: {why}")
    if args.out:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "device": device, "torch": torch.__version__,
            "args": {k: v for k, v in vars(args).items() if k != "one"},
            "results": [asdict(r) for r in results], "failures": failures}, indent=2))
    return 1 if not results else 0


if __name__ == "__main__":
    sys.exit(main())
