"""Qwen3-MoE across layouts: expert parallelism (EP=2 over gloo all-to-all) and pipeline parallelism
behave like the single-rank actor; an EP=2 checkpoint reshards to EP=1 and back. (Dense tensor
parallelism cannot train an MoE model without sequence parallelism: refused, see actor/moe.py.)

Each layout runs `tp_pp_worker.py` on 2 gloo ranks and is compared with the one-rank reference
computed in this process, with the checks of `test_tp_pp.py` (bit-exact HF export before training,
log-probs to 1e-5, loss and gradient norm to 1e-5 relative, updated weights, every rank alike) plus
the router metrics: the aux loss and per-layer expert load are sums over the same micro-batches in
every layout (each data-parallel rank routes its own rows), so they match too. The gradient of every
parameter (`main_grad`, `tp_pp_worker.hf_grads`: HF names, experts under their global index gathered
over EP, stages broadcast) matches the reference with test_tp_pp's `assert_close_grads` (each
element within 2e-5 x its parameter's largest gradient element; EP and PP only reorder float32 sums:
measured 1.1e-6 at EP=2 and PP=2).

Context parallelism (CP=2, packed, `packing_worker.py`) matches the packed CP=1 actor with
test_packing_cp's checks, router metrics included (summed over DP x CP ranks) and the router's
gradient (megatron's aux-loss gradient under CP, see actor/moe.py). The batch's sequence lengths are
multiples of 2 x CP, so CP pads nothing: the actor routes padding tokens, which would otherwise
enter the expert load and the aux loss at CP=2 only.

The model is a 4-layer tiny Qwen3-MoE (4 experts, top-2, layer 1 dense). Ports 29680-29689.
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

from tests.distributed.packing_worker import ALIGNED
from tests.distributed.packing_worker import run as packed_run
from tests.distributed.test_packing_cp import assert_matches
from tests.distributed.test_tp_pp import _assert_close_weights, assert_close_grads
from tests.distributed.tp_pp_worker import run
from tests.tiny_models import tiny_hf_model
from tests.unit.test_converters import assert_same_weights
from tools.convert_megatron_to_hf import main as megatron_to_hf

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 900  # a 2-rank MoE step is ~1.5 min on 2 idle cores; shared machines are slower


def _torchrun(port: int, script: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                    str(port), str(ROOT / script), *args], check=True, env=env, cwd=ROOT, timeout=TIMEOUT,
                   stdout=subprocess.DEVNULL)


def _launch(hf_dir: Path, out: Path, layout: dict[str, Any], port: int) -> list[dict[str, Any]]:
    _torchrun(port, "tests/distributed/tp_pp_worker.py", str(hf_dir), str(out), json.dumps(layout))
    return [torch.load(f"{out}.{rank}.pt") for rank in range(2)]

CASES = [  # (layout, master port)
    ({"ep": 2}, 29680),  # 2 experts per rank; dense layers data-parallel
    ({"pp": 2}, 29681),  # MoE layers on both stages, the dense layer 1 on the first
]
# Not here: expert TP = 2 (megatron's backward all-gather for it allocates on the CUDA device inside
# autograd, where the CPU adapter does not reach), and dense TP (refused for MoE training, see above).


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_hf_model("qwen3_moe", tmp_path_factory.mktemp("moe") / "qwen3_moe", num_hidden_layers=4,
                         tokenizer=False)


@pytest.fixture(scope="module")
def reference(model: Path) -> dict[str, Any]:
    result = run(model, {})
    result.pop("dims")
    return result


def test_reference_routes_and_exports_every_expert(model: Path, reference: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    ckpt = load_file(model / "model.safetensors")
    assert sorted(reference["before"]) == sorted(ckpt)
    assert all(torch.equal(reference["before"][k], v) for k, v in ckpt.items())
    stats = reference["stats"]
    assert stats["moe/aux_loss"] > 0 and 1.0 <= stats["moe/load_imbalance"] <= 4 / 2
    assert {k for k in stats if k.startswith("moe/layer_")} == {f"moe/layer_{i}/load_imbalance" for i in (0, 2, 3)}
    # Training moved the router and every expert (each gets tokens in this batch).
    after = reference["after"]
    assert not torch.equal(after["model.layers.0.mlp.gate.weight"], ckpt["model.layers.0.mlp.gate.weight"])
    for e in range(4):
        name = f"model.layers.3.mlp.experts.{e}.down_proj.weight"
        assert not torch.equal(after[name], ckpt[name]), name


@pytest.mark.parametrize(("layout", "port"), CASES, ids=["-".join(f"{k}{v}" for k, v in c.items()) for c, _ in CASES])
def test_moe_layout_matches_the_single_rank_actor(model: Path, reference: dict[str, Any], tmp_path: Path,
                                                  layout: dict[str, Any], port: int) -> None:
    ranks = _launch(model, tmp_path / "out", layout, port)
    for got in ranks:
        assert sorted(got["before"]) == sorted(reference["before"])
        for name, tensor in reference["before"].items():
            assert torch.equal(got["before"][name], tensor), name
        assert torch.allclose(got["logprobs"], reference["logprobs"], atol=1e-5, rtol=0)
        assert got["stats"]["tokens"] == reference["stats"]["tokens"]
        for key, value in reference["stats"].items():
            if key in ("loss", "grad_norm") or key.startswith("moe/"):
                assert got["stats"][key] == pytest.approx(value, rel=1e-5), key
        assert sorted(reference["grads"]) == sorted(reference["before"])  # every parameter, every expert
        assert_close_grads(got["grads"], reference["grads"])
        _assert_close_weights(got["after"], reference["after"])
        assert torch.allclose(got["logprobs_after"], reference["logprobs_after"], atol=1e-4, rtol=0)
    assert torch.equal(ranks[0]["logprobs"], ranks[1]["logprobs"])
    assert ranks[0]["stats"] == ranks[1]["stats"]
    for key in ("grads", "after"):
        for name, tensor in ranks[0][key].items():
            assert torch.equal(tensor, ranks[1][key][name]), (key, name)


def test_moe_context_parallel_matches_one_rank(model: Path, tmp_path: Path) -> None:
    packed = {"pack": True, "micro_batch_tokens": 64, "aligned": True}
    reference = packed_run(model, packed)
    reference.pop("dims")
    assert reference["stats"]["actor/padding_fraction"] == 0.0
    _torchrun(29685, "tests/distributed/packing_worker.py", str(model), str(tmp_path / "out"),
              json.dumps({**packed, "cp": 2}))
    ranks = [torch.load(f"{tmp_path / 'out'}.{rank}.pt") for rank in range(2)]
    moe_keys = {k for k in reference["stats"] if k.startswith("moe/")}
    assert "moe/aux_loss" in moe_keys and "moe/layer_3/load_imbalance" in moe_keys
    for got in ranks:
        assert got["stats"]["actor/padding_fraction"] == 0.0  # CP = 2 routes the same tokens as CP = 1
        assert_matches(got, reference, ALIGNED)
        for key in moe_keys:
            assert got["stats"][key] == pytest.approx(reference["stats"][key], rel=1e-6), key
    assert ranks[0]["stats"] == ranks[1]["stats"]  # each CP rank routed different tokens; all report the sum


def test_expert_parallel_checkpoint_reshards_to_one_rank(model: Path, tmp_path: Path) -> None:
    """HF -> megatron at EP=2 (each rank writes its 2 experts per layer), then back at EP=1: bit-exact."""
    _torchrun(29683, "tools/convert_hf_to_megatron.py", "--hf", str(model), "--out", str(tmp_path / "mg"), "--ep", "2")
    assert megatron_to_hf(["--ckpt", str(tmp_path / "mg"), "--out", str(tmp_path / "back")]) == 0
    assert_same_weights(model, tmp_path / "back")


def test_one_rank_checkpoint_exported_by_two_expert_parallel_ranks(model: Path, tmp_path: Path) -> None:
    from tools.convert_hf_to_megatron import main as hf_to_megatron

    assert hf_to_megatron(["--hf", str(model), "--out", str(tmp_path / "mg")]) == 0
    _torchrun(29684, "tools/convert_megatron_to_hf.py", "--ckpt", str(tmp_path / "mg"), "--out", str(tmp_path / "back"),
              "--ep", "2")
    assert_same_weights(model, tmp_path / "back")
