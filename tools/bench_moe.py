"""MoE actor step time at expert-parallel size 1 vs 2 on the same 2-rank world.

    torchrun --nproc-per-node 2 tools/bench_moe.py --out runs/bench_moe.json

A random Qwen3-MoE of a small shape (`--hidden`, `--layers`, `--experts`, `--topk`) is written once
to `--cache`; then, for each EP size, both ranks build the real actor (megatron MoE layers, all-to-all
dispatcher, megatron optimizer) and time `train_step` (forward, backward, Adam) on random
full-length sequences, plus one `export_hf_weights` (the refit's gather: EP=2 all-gathers each
expert slot). EP=1 on 2 ranks is plain data parallelism with every expert on both ranks; EP=2 puts
half the experts on each rank (and the dense parts stay data-parallel). Rank 0 prints a table and
writes JSON. On CPU this measures the gloo all-to-all's cost against halving the expert weights
per rank; it says nothing about GPU speed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_model(args: argparse.Namespace) -> Path:
    """The random Qwen3-MoE folder for this shape (built by rank 0, reused when present)."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    path = Path(args.cache) / f"qwen3moe-h{args.hidden}-l{args.layers}-e{args.experts}-k{args.topk}"
    if dist.get_rank() == 0 and not (path / "config.json").is_file():
        cfg = Qwen3MoeConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                             moe_intermediate_size=args.hidden, num_experts=args.experts,
                             num_experts_per_tok=args.topk, norm_topk_prob=True, num_hidden_layers=args.layers,
                             num_attention_heads=args.hidden // 64, num_key_value_heads=max(args.hidden // 128, 1),
                             head_dim=64, max_position_embeddings=max(args.seq, 256), tie_word_embeddings=False,
                             dtype="float32", architectures=["Qwen3MoeForCausalLM"])
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).to(torch.float32).save_pretrained(path)
    dist.barrier()
    return path


def time_layout(path: Path, ep: int, args: argparse.Namespace) -> dict[str, float]:
    from megatron_speed.actor.actor import MegatronActor
    from megatron_speed.config.schema import AlgorithmConfig, ModelConfig, OptimConfig, ParallelConfig
    from megatron_speed.parallel import init_parallel

    init_parallel(ParallelConfig(expert_parallel_size=ep), seed=0)
    rows = args.rows
    actor = MegatronActor(path, model_cfg=ModelConfig(hf_path=str(path)),
                          optim_cfg=OptimConfig(lr=1e-6, min_lr=1e-6, mini_batch_size=rows,
                                                micro_batch_size=args.micro_batch),
                          algorithm_cfg=AlgorithmConfig(), temperature=1.0, horizon=args.seq,
                          total_steps=args.steps + args.warmup)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (rows, args.seq), generator=gen)
    mask = torch.ones(rows, args.seq - 1)
    old = -torch.rand(rows, args.seq - 1, generator=gen) * 5
    adv = torch.randn(rows, 1, generator=gen).expand(rows, args.seq - 1).contiguous()
    for _ in range(args.warmup):
        actor.train_step(tokens, mask, old, adv)
    dist.barrier()
    started = time.perf_counter()
    for _ in range(args.steps):
        stats = actor.train_step(tokens, mask, old, adv)
    step_s = (time.perf_counter() - started) / args.steps
    dist.barrier()
    started = time.perf_counter()
    exported = sum(t.numel() for _, t in actor.export_hf_weights())
    export_s = time.perf_counter() - started
    experts_here = sum(p.numel() for n, p in actor.module.named_parameters() if ".experts." in n)
    return {"ep": ep, "step_s": step_s, "tokens_per_s": rows * args.seq / step_s, "export_s": export_s,
            "exported_params": exported, "expert_params_per_rank": experts_here,
            "load_imbalance": stats.get("moe/load_imbalance", float("nan")), "loss": stats["loss"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rows", type=int, default=16, help="rows per train step (both ranks together)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--ep", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cache", default="runs/bench_models")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from megatron_speed.config.schema import ParallelConfig
    from megatron_speed.parallel import destroy_parallel, init_parallel

    init_parallel(ParallelConfig(), seed=0)
    if dist.get_world_size() != 2:
        print("run under `torchrun --nproc-per-node 2`", file=sys.stderr)
        return 2
    path = write_model(args)
    results = [time_layout(path, ep, args) for ep in args.ep]
    if dist.get_rank() == 0:
        print(f"{'EP':>3} {'step s':>8} {'tokens/s':>9} {'export s':>9} {'expert params/rank':>19} {'imbalance':>10}")
        for r in results:
            print(f"{r['ep']:>3} {r['step_s']:>8.3f} {r['tokens_per_s']:>9.0f} {r['export_s']:>9.3f} "
                  f"{r['expert_params_per_rank']:>19,} {r['load_imbalance']:>10.3f}")
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
                "device": platform.processor() or platform.machine(), "cpus": torch.get_num_threads(),
                "torch": torch.__version__, "world": 2, "args": vars(args), "results": results}, indent=2))
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
