"""One rank of the SPMD engine check (run by test_spmd_engine.py under torchrun, 2 ranks, gloo).

Each rank builds its vLLM engine shard with the external launcher (rollout TP from argv), serves its
replica's share of a 5-request plan, scores on the replica leader (counting how many groups it
graded), gathers, then walks the trainer's sleep -> wake(weights) -> bucketed refit ->
wake(kv_cache) sequence with full HF tensors of a perturbed model and generates again. Everything
the test asserts on is written to <out>/rank<r>.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from megatron_speed.config.schema import ParallelConfig, RolloutConfig
from megatron_speed.parallel import init_parallel
from megatron_speed.records import PromptRecord, RolloutGroup, SampleRequest
from megatron_speed.rollout.replicas import ReplicaLayout, score_and_gather

BUCKET_MB = 1 / 16  # 64 KiB: splits the tiny model's qkv and gate/up layers across buckets


def plan() -> list[SampleRequest]:
    return [SampleRequest(prompt=PromptRecord(uid=f"p{i}", prompt=f" {i}+{2 * i}=", answer=str(3 * i)), n=2 + i % 2,
                          phase="screen" if i % 2 else "train") for i in range(5)]


def as_rows(groups: list[RolloutGroup]) -> list[dict]:
    return [{"uid": g.prompt.uid, "phase": g.phase, "prompt_ids": list(g.prompt_token_ids), "rewards": list(g.rewards),
             "completions": [(list(c.token_ids), list(c.logprobs)) for c in g.completions]} for g in groups]


def main() -> None:
    from safetensors.torch import load_file

    from megatron_speed.rollout.engine import VLLMEngine

    hf_dir, moved_dir, out, tp = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    dims = init_parallel(ParallelConfig(), seed=1)
    layout = ReplicaLayout(dims.world_size, dims.rank, tp)
    cfg = RolloutConfig(n=2, max_new_tokens=6, kv_cache_gib=0.05, tensor_parallel_size=tp, refit_bucket_mb=BUCKET_MB)
    engine = VLLMEngine(hf_dir, cfg, max_model_len=64, world_size=dims.world_size, seed=7 + layout.replica,
                        rank=layout.replica)

    scored: list[str] = []

    def score(groups: list[RolloutGroup]) -> dict[str, float]:
        scored.extend(g.prompt.uid for g in groups)
        for g in groups:
            g.rewards = [float(len(c.token_ids) % 2) for c in g.completions]
        return {"reward/errors": 0.0, "reward/graded": float(len(groups))}

    requests = plan()
    local = engine.generate(layout.local(requests), policy_version=0)
    local_rows = as_rows(local)
    gathered, faults = score_and_gather(layout, local, score)

    moved = load_file(str(moved_dir / "model.safetensors"))
    named = [(n, t) for n, t in moved.items() if n != "lm_head.weight"]
    engine.sleep()
    engine.wake_up(["weights"])
    refit = engine.update_weights(iter(named))
    engine.wake_up(["kv_cache"])
    after = engine.generate(requests, policy_version=1)  # every replica: the whole plan, new weights

    torch.save({"local": local_rows, "gathered": as_rows(gathered), "faults": faults, "scored": scored,
                "refit": refit.metrics(), "after": as_rows(after), "state": engine.state,
                "replica": layout.replica, "leader": layout.is_leader}, out / f"rank{dims.rank}.pt")


if __name__ == "__main__":
    main()
