"""One rank of the data-parallel token-mean check (run by test_dp_token_mean.py under torchrun).

Each of the 2 ranks holds a different slice of one batch, with different response-token counts.
The rank runs megatron's schedule (calculate_per_token_loss) and writes its gradients after
finalize_model_grads, which all-reduces the gradients and the token count over data parallelism.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from megatron_speed.actor.actor import MegatronActor, _split
from megatron_speed.config.schema import AlgorithmConfig, ModelConfig, OptimConfig, ParallelConfig
from megatron_speed.parallel import destroy_parallel, init_parallel
from megatron_speed.parallel.cpu_support import cpu_megatron


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, 32, (8, 14), generator=gen)
    mask = torch.zeros(8, 13)
    for i in range(8):
        mask[i, 2:2 + 1 + (i * 7) % 11] = 1.0  # rank 0 rows hold far fewer tokens than rank 1 rows
    adv = torch.randn(8, 1, generator=gen) * mask
    return tokens, mask, adv


def gradients(actor: MegatronActor, rows: slice) -> dict[str, torch.Tensor]:
    tokens, mask, adv = fixed_batch()
    old = actor.compute_logprobs(tokens) - 0.05 * mask
    with cpu_megatron():
        actor.model.zero_grad_buffer()
        actor._run_schedule(_split(2, tokens[rows], mask[rows], old[rows], adv[rows]), train=True)
    return {n: p.main_grad.clone() for n, p in actor.module.named_parameters()}


def main() -> None:
    hf_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    dims = init_parallel(ParallelConfig(), seed=1)
    assert dims.dp == 2, dims
    actor = MegatronActor(hf_dir, model_cfg=ModelConfig(), optim_cfg=OptimConfig(micro_batch_size=2,
                          mini_batch_size=4), algorithm_cfg=AlgorithmConfig(), temperature=1.0, horizon=11,
                          total_steps=1)
    half = slice(4 * dims.rank, 4 * dims.rank + 4)
    grads = gradients(actor, half)
    if dims.rank == 0:
        torch.save(grads, out)
    destroy_parallel()


if __name__ == "__main__":
    main()
