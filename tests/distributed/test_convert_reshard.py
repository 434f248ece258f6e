"""The converter CLIs across layouts: HF -> megatron at TP=2 (or PP=2) on 2 gloo ranks, then back to HF
at TP=1 in one process (dist-checkpointing reshards on load), bit-exact against the source; and a
TP=1 checkpoint exported by 2 TP ranks; uneven pipeline stages both ways. Ports 29620-29629."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_speed.checkpoint.layout import read_meta
from tests.tiny_models import tiny_hf_model
from tests.unit.test_converters import assert_same_weights
from tools.convert_hf_to_megatron import main as hf_to_megatron
from tools.convert_megatron_to_hf import main as megatron_to_hf

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]


def _torchrun(port: int, tool: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                    str(port), str(ROOT / "tools" / tool), *args], check=True, env=env, cwd=ROOT, timeout=300)


@pytest.mark.parametrize(("layout", "port"), [(("--tp", "2", "--pp", "1"), 29620), (("--tp", "1", "--pp", "2"), 29621)])
def test_two_rank_checkpoint_reshards_to_one_rank(tmp_path: Path, layout: tuple[str, ...], port: int) -> None:
    src = tiny_hf_model("qwen2", tmp_path / "src")
    _torchrun(port, "convert_hf_to_megatron.py", "--hf", str(src), "--out", str(tmp_path / "mg"), *layout)
    assert megatron_to_hf(["--ckpt", str(tmp_path / "mg"), "--out", str(tmp_path / "back")]) == 0
    assert_same_weights(src, tmp_path / "back")


def test_uneven_stages_round_trip(tmp_path: Path) -> None:
    """A 3-layer model, which PP=2 cannot split evenly: HF -> megatron with 2 + 1 layers over PP=2, then
    back to HF with 1 + 2 layers over PP=2 and at PP=1: both bit-exact (layers are keyed globally)."""
    src = tiny_hf_model("llama", tmp_path / "src", num_hidden_layers=3)
    _torchrun(29624, "convert_hf_to_megatron.py", "--hf", str(src), "--out", str(tmp_path / "mg"), "--pp", "2",
              "--last-stage-layers", "1")
    assert read_meta(tmp_path / "mg")["layers_per_stage"] == [2, 1]
    _torchrun(29625, "convert_megatron_to_hf.py", "--ckpt", str(tmp_path / "mg"), "--out", str(tmp_path / "back"),
              "--pp", "2", "--first-stage-layers", "1")
    assert_same_weights(src, tmp_path / "back")
    assert megatron_to_hf(["--ckpt", str(tmp_path / "mg"), "--out", str(tmp_path / "back1")]) == 0
    assert_same_weights(src, tmp_path / "back1")


def test_one_rank_checkpoint_exported_by_two_tensor_parallel_ranks(tmp_path: Path) -> None:
    src = tiny_hf_model("qwen2", tmp_path / "src", tie=True)
    assert hf_to_megatron(["--hf", str(src), "--out", str(tmp_path / "mg")]) == 0
    _torchrun(29622, "convert_megatron_to_hf.py", "--ckpt", str(tmp_path / "mg"), "--out", str(tmp_path / "back"),
              "--tp", "2")
    assert_same_weights(src, tmp_path / "back")
