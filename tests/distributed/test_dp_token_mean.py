"""Token-mean is exact across data-parallel ranks: 2 gloo ranks with uneven token counts produce
the gradient of the token-mean over the WHOLE batch, the same as one process holding all rows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_speed.config.schema import AlgorithmConfig, ModelConfig, OptimConfig, ParallelConfig
from megatron_speed.parallel import init_parallel
from tests.distributed.dp_grad_worker import gradients
from tests.unit.test_actor import _tiny_qwen2

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]


def test_two_rank_gradient_equals_the_whole_batch_gradient(tmp_path: Path) -> None:
    from megatron_speed.actor.actor import MegatronActor

    hf_dir = _tiny_qwen2(tmp_path / "model")
    out = tmp_path / "grads.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                    "29533", str(ROOT / "tests/distributed/dp_grad_worker.py"), str(hf_dir), str(out)],
                   check=True, env=env, cwd=ROOT, timeout=300)
    dp = torch.load(out)

    init_parallel(ParallelConfig(), seed=1)
    actor = MegatronActor(hf_dir, model_cfg=ModelConfig(), optim_cfg=OptimConfig(micro_batch_size=2,
                          mini_batch_size=8), algorithm_cfg=AlgorithmConfig(), temperature=1.0, horizon=11,
                          total_steps=1)
    whole = gradients(actor, slice(0, 8))
    assert max(g.abs().max().item() for g in whole.values()) > 1e-3
    for name, g in whole.items():
        assert torch.allclose(dp[name], g, atol=1e-7, rtol=1e-5), name
