"""Actor training throughput: tokens/s, MFU and peak memory of `MegatronActor.train_step`.

The model is a random HF model of a named shape (default: Qwen2.5-1.5B) written once to a cache
folder, loaded by the real actor (bridge, megatron-core GPTModel, megatron optimizer) and trained
with the real RL loss on random full-length sequences. Each attention backend runs in its own
subprocess so peak-memory figures do not leak between them:

    python tools/bench_actor.py --out runs/bench_actor.json                  # H100: local vs sdpa (+ te)
    python tools/bench_actor.py --shape tiny --seq 64 --backends local sdpa  # CPU smoke run

MFU counts model FLOPs only (recomputation is not credited): per trained token
6 * (matmul parameters incl. the LM head) + 6 * layers * seq * heads * head_dim (causal attention,
forward + backward, half of the S x S products), divided by the card's dense bf16 peak
(`--peak-tflops`, 989 for an H100 SXM).
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


def flops_per_token(hf: dict[str, int], seq: int) -> float:
    d, layers, heads, kv = hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"], \
        hf["num_key_value_heads"]
    head_dim = d // heads
    attn = d * head_dim * (heads + 2 * kv) + heads * head_dim * d
    mlp = 3 * d * hf["intermediate_size"]
    matmul_params = layers * (attn + mlp) + d * hf["vocab_size"]
    return 6.0 * matmul_params + 6.0 * layers * seq * heads * head_dim


def run_one(args: argparse.Namespace, backend: str) -> Result:
    from megatron_speed.actor.actor import MegatronActor
    from megatron_speed.config.schema import AlgorithmConfig, ModelConfig, OptimConfig, ParallelConfig
    from megatron_speed.parallel import init_parallel

    path = model_dir(args.shape, Path(args.cache), max_positions=max(args.seq, 4096))
    init_parallel(ParallelConfig(), seed=0)
    on_gpu = torch.cuda.is_available()
    rows = args.micro_batch * args.micro_batches
    actor = MegatronActor(path, model_cfg=ModelConfig(hf_path=str(path), params_dtype="bfloat16" if on_gpu else
                                                      "float32", attention_backend=backend,
                                                      recompute=args.recompute),
                          optim_cfg=OptimConfig(lr=1e-6, min_lr=1e-6, mini_batch_size=rows,
                                                micro_batch_size=args.micro_batch),
                          algorithm_cfg=AlgorithmConfig(), temperature=1.0, horizon=args.seq,
                          total_steps=args.steps + args.warmup)
    device = torch.device("cuda") if on_gpu else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, SHAPES[args.shape]["vocab_size"], (rows, args.seq), generator=gen).to(device)
    mask = torch.ones(rows, args.seq - 1, device=device)
    mask[:, : args.seq // 8] = 0  # a prompt that is not trained on, as in RL
    old = -torch.rand(rows, args.seq - 1, generator=gen).to(device) * 5
    adv = torch.randn(rows, 1, generator=gen).to(device).expand(rows, args.seq - 1).contiguous()

    def step() -> float:
        stats = actor.train_step(tokens, mask, old, adv)
        if on_gpu:
            torch.cuda.synchronize()
        return stats["loss"]

    for _ in range(args.warmup):
        step()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    seconds = (time.perf_counter() - started) / args.steps
    tokens_per_s = rows * args.seq / seconds
    mfu = 100.0 * tokens_per_s * flops_per_token(SHAPES[args.shape], args.seq) / (args.peak_tflops * 1e12)
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else float("nan")
    return Result(args.shape, backend, args.seq, args.micro_batch, args.recompute, tokens_per_s, seconds, mfu,
                  peak, loss)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--micro-batches", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    parser.add_argument("--backends", nargs="+", default=["local", "sdpa", "te"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--cache", default="runs/bench_models")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one backend, print JSON
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(asdict(run_one(args, args.one))), flush=True)
        return 0
    results, failures = [], {}
    model_dir(args.shape, Path(args.cache), max_positions=max(args.seq, 4096))  # once, before the subprocesses
    for backend in args.backends:
        cmd = [sys.executable, __file__, "--one", backend, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MASTER_PORT": "29590"})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            failures[backend] = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            continue
        results.append(Result(**json.loads(lines[-1][len("RESULT "):])))
    print(f"{'backend':8} {'seq':>6} {'mb':>3} {'tokens/s':>10} {'step s':>8} {'MFU %':>6} {'peak GiB':>9}")
    for r in results:
        print(f"{r.backend:8} {r.seq:>6} {r.micro_batch:>3} {r.tokens_per_s:>10.0f} {r.step_s:>8.3f} "
              f"{r.mfu_percent:>6.1f} {r.peak_gib:>9.1f}")
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
