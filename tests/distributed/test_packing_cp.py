"""Packed sequences and context parallelism behave like the padded single-rank actor.

The batch (packing_worker.py) holds 8 right-padded rows whose responses span 2..80 tokens (40x);
packed runs use a 64-token budget, so the 85-token row gets a micro-batch of its own and the others
share rows. The reference is the padded, fixed-micro-batch actor in this process (a world of one).
Compared, in float32:

* log-probs at every position a row's tokens reach (past a row's end the padded layout computes
  log-probs of padding, which packing never does): max |diff| <= 1e-5 before the update, 1e-4 after;
* the step's loss and gradient norm to 1e-5 relative, token counts exactly;
* the gradient of every parameter the step used (`main_grad`, exported like the weights: TP shards
  gathered into full HF-named tensors, pipeline stages broadcast), in every layout: each element
  within 2e-5 x the largest |element| of that parameter's reference gradient (test_tp_pp's
  `assert_close_grads`).
  Layouts only reorder float32 sums (packed attention, the CP split and K/V gather, TP's
  row-parallel all-reduce), which moves a gradient by a few ulps of its largest terms: measured
  max |diff| / max |ref| 5e-7 packed, 5e-7 DP=2 and PP=2, 2e-6 CP=2, 1.1e-6 CP=2 x TP=2 (and 1.1e-6
  for the MoE layouts of test_moe_ep). The bound scales with each parameter because gradient sizes
  span 2e-4..5e-2 here and 3e-7..0.25 in the MoE test, where a fixed atol would pass anything;
  a token counted twice, a wrong scale or a shard out of order moves a gradient by far more
  (the CP aux-loss scale this caught: 0.7 x the router's gradient);
* the HF weights after one Adam step, with test_tp_pp's tolerance for Adam's amplified rounding;
* every rank returns the same full results.

Packed-only properties: changing one sequence's tokens leaves every other sequence's log-probs
bit-identical (attention never crosses sequences), the loss aggregations that work per sequence
(seq-mean-token-mean, with an entropy bonus) match too, and `actor/padding_fraction` drops.
Layouts over torchrun: CP=2, DP=2 (packing balanced over data-parallel ranks), PP=2, and CP=2 x
TP=2 on 4 ranks (llama, whose Llama-3 RoPE scaling makes every position's frequencies matter). The
CP=2 run also writes a trainer checkpoint, which the converter reads back at CP=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed.packing_worker import PROMPTS, RESPONSES, reached, run
from tests.distributed.test_tp_pp import _assert_close_weights, assert_close_grads
from tests.tiny_models import tiny_hf_model

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
PACKED = {"pack": True, "micro_batch_tokens": 64}
FAMILIES = {"qwen2": dict(tie=True), "llama": dict(tie=False)}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packing_models")
    return {f: tiny_hf_model(f, root / f, tokenizer=False, **kw) for f, kw in FAMILIES.items()}


@pytest.fixture(scope="module")
def references(models: dict[str, Path]) -> dict[str, dict[str, Any]]:
    out = {}
    for family, path in models.items():
        result = run(path, {})
        result.pop("dims")
        out[family] = result
    return out


def assert_matches(got: dict[str, Any], ref: dict[str, Any], responses: list[int] = RESPONSES) -> None:
    """`got` (a layout's results) == `ref` (the padded single-rank actor's) within the tolerances above."""
    mask = reached(responses)
    assert (got["logprobs"] - ref["logprobs"]).abs()[mask].max() <= 1e-5
    assert (got["logprobs_after"] - ref["logprobs_after"]).abs()[mask].max() <= 1e-4
    assert got["stats"]["tokens"] == ref["stats"]["tokens"]
    for key in ("loss", "grad_norm"):
        assert got["stats"][key] == pytest.approx(ref["stats"][key], rel=1e-5), key
    assert sorted(ref["grads"]) == sorted(ref["after"])  # every parameter
    assert_close_grads(got["grads"], ref["grads"])
    _assert_close_weights(got["after"], ref["after"])



def test_packed_equals_padded(models: dict[str, Path], references: dict[str, dict[str, Any]]) -> None:
    got = run(models["qwen2"], PACKED)
    got.pop("dims")
    assert_matches(got, references["qwen2"])
    assert got["stats"]["actor/padding_fraction"] == 0.0  # CP = 1: nothing is padded
    assert references["qwen2"]["stats"]["actor/padding_fraction"] > 0.5  # rows padded to 85 tokens


def test_packed_equals_padded_per_sequence_loss_with_entropy(models: dict[str, Path]) -> None:
    layout = {"aggregation": "seq-mean-token-mean", "entropy_coef": 0.01}
    ref, got = run(models["qwen2"], layout), run(models["qwen2"], {**layout, **PACKED})
    ref.pop("dims"), got.pop("dims")
    assert_matches(got, ref)


def test_packed_sequences_never_attend_across(models: dict[str, Path]) -> None:
    from megatron_speed.actor.packing import balanced_bins

    lengths = [p + r for p, r in zip(PROMPTS, RESPONSES)]
    packed_rows = balanced_bins(lengths, capacity=PACKED["micro_batch_tokens"])[0]
    assert [0, 2, 3] in packed_rows  # row 2 sits between rows 0 and 3 in one packed row
    base = run(models["qwen2"], {**PACKED, "forward_only": True})["logprobs"]
    changed = run(models["qwen2"], {**PACKED, "forward_only": True}, perturb_row=2)["logprobs"]
    mask = reached(RESPONSES)
    assert not torch.equal(base[2][mask[2]], changed[2][mask[2]])
    others = [r for r in range(len(RESPONSES)) if r != 2]  # incl. the sequences before and after it
    assert torch.equal(base[others], changed[others])


def _launch(hf_dir: Path, out: Path, layout: dict[str, Any], port: int, ranks: int) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
                    str(port), str(ROOT / "tests/distributed/packing_worker.py"), str(hf_dir), str(out),
                    json.dumps(layout)], check=True, env=env, cwd=ROOT, timeout=600, stdout=subprocess.DEVNULL)
    return [torch.load(f"{out}.{rank}.pt") for rank in range(ranks)]


CASES = [  # (family, layout, ranks, master port)
    ("qwen2", {"cp": 2}, 2, 29620),
    ("qwen2", {}, 2, 29621),  # DP = 2
    ("qwen2", {"pp": 2}, 2, 29622),
    ("llama", {"cp": 2, "tp": 2}, 4, 29623),
]


@pytest.mark.parametrize(("family", "layout", "ranks", "port"), CASES,
                         ids=[f"{f}-{'-'.join(f'{k}{v}' for k, v in lay.items()) or 'dp2'}" for f, lay, _, _ in CASES])
def test_packed_layout_matches_the_padded_single_rank_actor(models: dict[str, Path],
                                                            references: dict[str, dict[str, Any]], tmp_path: Path,
                                                            family: str, layout: dict[str, Any], ranks: int,
                                                            port: int) -> None:
    save = layout == {"cp": 2}
    full = {**layout, **PACKED, **({"save": str(tmp_path / "ckpt")} if save else {})}
    results = _launch(models[family], tmp_path / "out", full, port, ranks)
    for got in results:
        assert_matches(got, references[family])
    for got in results[1:]:  # the SPMD contract: every rank returned the same full results
        assert torch.equal(got["logprobs"], results[0]["logprobs"]) and got["stats"] == results[0]["stats"]
        assert all(torch.equal(grad, results[0]["grads"][name]) for name, grad in got["grads"].items())
    if save:
        _check_checkpoint_converts(tmp_path / "ckpt", tmp_path / "hf", results[0]["after"])


def _check_checkpoint_converts(root: Path, out: Path, after: dict[str, torch.Tensor]) -> None:
    """The CP=2 trainer checkpoint records its layout and converts to HF at CP=1 (weights are not
    split by CP, so the converter needs nothing CP-specific)."""
    from safetensors.torch import load_file

    from megatron_speed.checkpoint.convert import megatron_to_hf
    from megatron_speed.checkpoint.layout import read_meta

    assert read_meta(root / "step_000001")["cp"] == 2
    megatron_to_hf(root, out)
    weights = load_file(out / "model.safetensors")
    for name, tensor in after.items():
        assert torch.equal(weights[name], tensor), name
