"""Tensor-, pipeline- and virtual-pipeline-parallel actors behave like the single-rank actor.

Each case runs `tp_pp_worker.py` on 2 gloo ranks and compares every rank's results with the TP=1
reference computed in this process (a world of one; megatron's groups are global, so the reference
cannot share the torchrun world). Checked per case:

* HF export before training is bit-identical to the reference's (which is the checkpoint itself):
  loading takes shards by slicing and exporting gathers them by concatenation, nothing else;
* log-probs match to 1e-5 (float32; only the reduction order of TP partial sums differs);
* the training step's loss and gradient norm match to 1e-5 relative, token counts exactly;
* the gradient of every parameter (`main_grad` as full HF-named tensors, `tp_pp_worker.hf_grads`;
  not with the distributed optimizer, whose buffer holds shards): each element within 2e-5 x its
  parameter's largest reference element (`assert_close_grads`; see test_packing_cp for the
  measured errors, <= 2e-6 of that scale);
* the updated HF weights match: Adam's first step is lr * g / (|g| + eps), which maps gradient
  noise of ~1e-7 relative to a visible change only where |g| is near eps (~1e-8). So at most 0.1 %
  of the elements may differ by more than 1e-6, and none by more than 10 % of the learning rate
  (measured: <= 20 elements per tensor, max 4.7e-5 at lr 1e-3). The key bias is the exception: its
  true gradient is exactly 0, so its update is amplified noise and is only bounded by 2 x lr;
* every rank returns the same full results (the SPMD contract).

The models are 4-layer tiny qwen2 (tied embeddings: PP puts a copy of the embedding on the last
stage) and llama (untied), so PP=2 x VPP=2 gets one layer per chunk; the uneven cases put 1 + 3
(qwen2, `first=1`) and 3 + 1 (llama, `last=1`) layers on the two stages, and a 6-layer qwen2 gets
2 + 4 layers over PP=2 x VPP=2 (chunks of 1, 2, 1, 2 layers).
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

from tests.distributed.tp_pp_worker import run
from tests.tiny_models import tiny_hf_model

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
LR = 1e-3
FAMILIES = {"qwen2": dict(tie=True), "llama": dict(tie=False)}  # 4 layers
MODELS = {**{f: dict(family=f, num_hidden_layers=4, **kw) for f, kw in FAMILIES.items()},
          "qwen2-6": dict(family="qwen2", num_hidden_layers=6, tie=True)}

CASES = [  # (family, layout, master port)
    ("qwen2", {"tp": 2}, 29610),
    ("qwen2", {"pp": 2}, 29611),
    ("qwen2", {"pp": 2, "vpp": 2, "micro_batch_tokens": 30}, 29612),
    ("qwen2", {"distributed_optimizer": True, "micro_batch_tokens": 30}, 29613),
    ("llama", {"tp": 2}, 29614),
    ("llama", {"pp": 2, "micro_batch_tokens": 30}, 29615),
    # Uneven stages (megatron's num_layers_in_first/last_pipeline_stage): 1 + 3, 3 + 1, and (1 + 1) + (2 + 2)
    # layers in virtual stages (6 layers).
    ("qwen2", {"pp": 2, "first": 1}, 29616),
    ("llama", {"pp": 2, "last": 1, "micro_batch_tokens": 30}, 29617),
    ("qwen2-6", {"pp": 2, "vpp": 2, "first": 2, "micro_batch_tokens": 30}, 29618),
]
UNEVEN = {29616: (1, 3), 29617: (3, 1), 29618: (2, 4)}  # port -> layers per stage


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp_pp_models")
    return {name: tiny_hf_model(kw["family"], root / name, tokenizer=False,
                                **{k: v for k, v in kw.items() if k != "family"}) for name, kw in MODELS.items()}


@pytest.fixture(scope="module")
def references(models: dict[str, Path]) -> dict[str, dict[str, Any]]:
    out = {}
    for family, path in models.items():
        result = run(path, {})
        result.pop("dims")
        out[family] = result
    return out


def _launch(hf_dir: Path, out: Path, layout: dict[str, Any], port: int) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                    str(port), str(ROOT / "tests/distributed/tp_pp_worker.py"), str(hf_dir), str(out),
                    json.dumps(layout)], check=True, env=env, cwd=ROOT, timeout=240,
                   stdout=subprocess.DEVNULL)
    return [torch.load(f"{out}.{rank}.pt") for rank in range(2)]


def test_reference_export_is_the_checkpoint(models: dict[str, Path], references: dict[str, dict[str, Any]]) -> None:
    from safetensors.torch import load_file

    for family, path in models.items():
        ckpt = load_file(path / "model.safetensors")
        exported = references[family]["before"]
        if MODELS[family]["tie"]:
            ckpt.pop("lm_head.weight", None)
        assert sorted(exported) == sorted(ckpt)
        for name, tensor in ckpt.items():
            assert torch.equal(exported[name], tensor), name


def _assert_close_weights(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(ref)
    off, total = 0, 0
    for name, tensor in ref.items():
        diff = (got[name] - tensor).abs()
        if name.endswith("k_proj.bias"):  # true gradient is 0 (softmax ignores a per-query shift): Adam
            assert diff.max().item() <= 2 * LR, name  # turns its rounding noise into +-lr steps
            continue
        assert diff.max().item() <= 0.1 * LR, name
        off, total = off + int((diff > 1e-6).sum()), total + diff.numel()
    assert off <= 1e-3 * total, f"{off} of {total} elements differ by more than 1e-6"


def assert_close_grads(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    """Same parameters; every gradient element within 2e-5 x its parameter's largest |ref| element (a
    bound that scales with each parameter: gradient sizes span orders of magnitude, and layouts only
    reorder float32 sums, which moves a gradient by a few ulps of its largest terms)."""
    assert sorted(got) == sorted(ref)
    for name, grad in ref.items():
        error = (got[name] - grad).abs().max()
        assert error <= 2e-5 * grad.abs().max(), (name, float(error), float(grad.abs().max()))


@pytest.mark.parametrize(("family", "layout", "port"), CASES,
                         ids=[f"{f}-{'-'.join(f'{k}{v}' for k, v in lay.items())}" for f, lay, _ in CASES])
def test_layout_matches_the_single_rank_actor(models: dict[str, Path], references: dict[str, dict[str, Any]],
                                              tmp_path: Path, family: str, layout: dict[str, Any], port: int) -> None:
    ref = references[family]
    ranks = _launch(models[family], tmp_path / "out", layout, port)
    for got in ranks:
        assert sorted(got["before"]) == sorted(ref["before"])
        for name, tensor in ref["before"].items():
            assert torch.equal(got["before"][name], tensor), name
        assert torch.allclose(got["logprobs"], ref["logprobs"], atol=1e-5, rtol=0)
        assert got["stats"]["tokens"] == ref["stats"]["tokens"]
        for key in ("loss", "grad_norm"):
            assert got["stats"][key] == pytest.approx(ref["stats"][key], rel=1e-5), key
        if not layout.get("distributed_optimizer"):
            assert sorted(ref["grads"]) == sorted(ref["before"])  # every parameter
            assert_close_grads(got["grads"], ref["grads"])
        _assert_close_weights(got["after"], ref["after"])
        assert torch.allclose(got["logprobs_after"], ref["logprobs_after"], atol=1e-4, rtol=0)
    # Every rank returned the same full results.
    assert torch.equal(ranks[0]["logprobs"], ranks[1]["logprobs"])
    assert ranks[0]["stats"] == ranks[1]["stats"]
    for name, tensor in ranks[0]["after"].items():
        assert torch.equal(tensor, ranks[1]["after"][name]), name
    if port in UNEVEN:  # each stage really built its own share of the layers
        assert [r["layers_per_stage"] for r in ranks] == [UNEVEN[port]] * 2
        assert [r["local_layers"] for r in ranks] == list(UNEVEN[port])
