"""LoRA at TP=2, PP=2 and DP=2 (distributed optimizer) behaves like LoRA at TP=1.

Each case runs `lora_worker.py` on 2 gloo ranks and compares with the single-rank reference computed
in this process. Checked: log-probs before training (the base model's: B starts at 0) and after two
steps, both steps' losses and gradient norms, every adapter gradient of both steps (full tensors: the
sharded halves gathered over TP; with PP each rank checks the layers it holds), the exported adapters
(PEFT names) and merged weights after training, and that every rank returned the same full results.

Tolerances (float32): only the reduction order of TP partial sums differs, so log-probs agree to
1e-5, losses and norms to 1e-5 relative, gradients to 1e-5 of their largest entry. After two Adam
steps at lr 1e-2 an adapter element can move by up to 2 lr; elements whose gradient is near Adam's
eps turn rounding noise into visible steps (as in test_tp_pp.py), so adapters may differ by at most
1e-3 relative to lr, and merged weights (B A products of those) by 1e-4 absolute.
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

from tests.distributed.lora_worker import run
from tests.tiny_models import tiny_hf_model

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
LR = 1e-2

CASES = [  # (layout, master port)
    ({"tp": 2}, 29640),
    ({"pp": 2}, 29641),
    ({"distributed_optimizer": True}, 29642),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_hf_model("qwen2", tmp_path_factory.mktemp("lora_tp") / "qwen2", num_hidden_layers=2, tokenizer=False)


@pytest.fixture(scope="module")
def reference(model: Path) -> dict[str, Any]:
    result = run(model, {})
    result.pop("dims")
    return result


def _launch(hf_dir: Path, out: Path, layout: dict[str, Any], port: int) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                    str(port), str(ROOT / "tests/distributed/lora_worker.py"), str(hf_dir), str(out),
                    json.dumps(layout)], check=True, env=env, cwd=ROOT, timeout=300, stdout=subprocess.DEVNULL)
    return [torch.load(f"{out}.{rank}.pt") for rank in range(2)]


def _close_grads(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert got and set(got) <= set(ref)
    for name, grad in got.items():
        scale = max(ref[name].abs().max().item(), 1e-12)
        assert (grad - ref[name]).abs().max().item() <= 1e-5 * scale, name


def test_reference_sanity(reference: dict[str, Any]) -> None:
    """The reference itself is meaningful: step 1 trains B only (A's gradient is exactly 0 at B = 0),
    step 2 trains both, and the policy moved."""
    a_grads = [g for n, g in reference["grads1"].items() if ".lora_A." in n]
    b_grads = [g for n, g in reference["grads1"].items() if ".lora_B." in n]
    assert all(torch.count_nonzero(g) == 0 for g in a_grads) and all(g.abs().max() > 0 for g in b_grads)
    assert all(g.abs().max() > 0 for g in reference["grads2"].values())
    assert (reference["logprobs_after"] - reference["logprobs"]).abs().max() > 1e-2


@pytest.mark.parametrize(("layout", "port"), CASES,
                         ids=["-".join(f"{k}{v}" for k, v in lay.items()) for lay, _ in CASES])
def test_lora_layout_matches_tp1(model: Path, reference: dict[str, Any], tmp_path: Path, layout: dict[str, Any],
                                 port: int) -> None:
    ref = reference
    ranks = _launch(model, tmp_path / "out", layout, port)
    for got in ranks:
        assert torch.allclose(got["logprobs"], ref["logprobs"], atol=1e-5, rtol=0)
        for step in (1, 2):
            for key in ("loss", "grad_norm"):
                assert got[f"stats{step}"][key] == pytest.approx(ref[f"stats{step}"][key], rel=1e-5), (step, key)
            assert got[f"stats{step}"]["tokens"] == ref[f"stats{step}"]["tokens"]
            if f"grads{step}" in got:
                _close_grads(got[f"grads{step}"], ref[f"grads{step}"])
        assert sorted(got["adapters"]) == sorted(ref["adapters"])
        for name, tensor in ref["adapters"].items():
            assert (got["adapters"][name] - tensor).abs().max().item() <= 1e-3 * LR, name
        for name, tensor in ref["merged"].items():
            assert (got["merged"][name] - tensor).abs().max().item() <= 1e-4, name
        assert torch.allclose(got["logprobs_after"], ref["logprobs_after"], atol=1e-4, rtol=0)
    if "pp" not in layout:  # with PP each rank holds (and reports gradients of) its own layers only
        assert sorted(ranks[0].get("grads2", {})) == sorted(ranks[1].get("grads2", {}))
    assert torch.equal(ranks[0]["logprobs_after"], ranks[1]["logprobs_after"])
    for name, tensor in ranks[0]["adapters"].items():
        assert torch.equal(tensor, ranks[1]["adapters"][name]), name
