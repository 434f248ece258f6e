"""One rank of the packing / context-parallel actor checks (run by test_packing_cp.py under torchrun,
or called in-process for the single-rank references).

Every rank builds the actor for the requested layout and, on the same full batch, computes
log-probs, takes one training step (one optimizer update over the whole batch), and records the
gradients the update used (`main_grad` of every parameter as full HF-named tensors, `hf_grads`), the
HF weights after the update, and the log-probs after it. Each rank writes `<out>.<rank>.pt`.

The batch spreads response lengths 2..80 (40x) over right-padded rows, with prompts of 3..6 tokens,
so packed micro-batches hold very different sequences and some sequences exceed the token budget.
With layout "aligned" every sequence is lengthened to a multiple of 4 (= 2 x CP for CP = 2), so CP = 2
pads nothing: what an MoE router sees is then the same tokens as at CP = 1 (the actor routes padding).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megatron_speed.config.schema import AlgorithmConfig, ModelConfig, OptimConfig, ParallelConfig
from megatron_speed.parallel import init_parallel
from tests.distributed.tp_pp_worker import hf_grads, worker_main

RESPONSES = [2, 80, 7, 33, 15, 61, 4, 24]  # response tokens per row: 1..40x spread
PROMPTS = [3, 5, 4, 6, 3, 4, 5, 6]
ALIGNED = [r + -(p + r) % 4 for p, r in zip(PROMPTS, RESPONSES)]  # sequence lengths 8..88, multiples of 4


def responses(layout: dict[str, Any]) -> list[int]:
    return ALIGNED if layout.get("aligned") else RESPONSES


def reached(responses: list[int]) -> torch.Tensor:
    """[8, W-1] True where a row's tokens reach (position < its length - 1)."""
    lengths = torch.tensor([p + r - 1 for p, r in zip(PROMPTS, responses)])
    return torch.arange(max(lengths))[None, :] < lengths[:, None]


def spread_batch(vocab: int, responses: list[int], seed: int = 11) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded tokens [8, W], response mask [8, W-1] and token advantages (W: the longest row)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(p + r for p, r in zip(PROMPTS, responses))
    tokens = torch.randint(2, vocab, (len(responses), width), generator=gen)
    mask = torch.zeros(len(responses), width - 1)
    for i, (p, r) in enumerate(zip(PROMPTS, responses)):
        tokens[i, p + r:] = 0  # padding
        mask[i, p - 1:p - 1 + r] = 1.0
    adv = torch.randn(len(responses), 1, generator=gen) * mask
    return tokens, mask, adv


def run(hf_dir: Path, layout: dict[str, Any], *, perturb_row: int | None = None) -> dict[str, Any]:
    """The actor's outputs for one layout. `perturb_row` changes that row's response tokens first."""
    from megatron_speed.actor.actor import MegatronActor

    parallel = ParallelConfig(tensor_parallel_size=layout.get("tp", 1), pipeline_parallel_size=layout.get("pp", 1),
                              context_parallel_size=layout.get("cp", 1))
    dims = init_parallel(parallel, seed=1)
    optim = OptimConfig(lr=1e-3, min_lr=1e-3, micro_batch_size=2, mini_batch_size=len(RESPONSES),
                        micro_batch_tokens=layout.get("micro_batch_tokens", 0),
                        pack_sequences=layout.get("pack", False))
    algorithm = AlgorithmConfig(loss_aggregation=layout.get("aggregation", "token-mean"),
                                entropy_coef=layout.get("entropy_coef", 0.0))
    rows = responses(layout)
    actor = MegatronActor(hf_dir, model_cfg=ModelConfig(attention_backend="sdpa"), optim_cfg=optim,
                          algorithm_cfg=algorithm, temperature=0.9, horizon=max(map(sum, zip(PROMPTS, rows))) - 1,
                          total_steps=1, tp=dims.tp, pp=dims.pp)
    tokens, mask, adv = spread_batch(actor.hf_config.vocab_size, rows)
    if perturb_row is not None:
        span = slice(PROMPTS[perturb_row], PROMPTS[perturb_row] + rows[perturb_row])
        tokens[perturb_row, span] = (tokens[perturb_row, span] + 7) % actor.hf_config.vocab_size
    logprobs = actor.compute_logprobs(tokens, mask=mask)
    result: dict[str, Any] = {"logprobs": logprobs, "dims": dims}
    if layout.get("forward_only"):
        return result
    stats = actor.train_step(tokens, mask, logprobs - 0.05 * mask, adv)
    result.update(stats=stats, grads=hf_grads(actor), after={k: v.clone() for k, v in actor.export_hf_weights()},
                  logprobs_after=actor.compute_logprobs(tokens, mask=mask))
    if layout.get("save"):  # a trainer checkpoint written at this layout (the converter test reads it)
        from megatron_speed.checkpoint.resume import save_checkpoint

        save_checkpoint(Path(layout["save"]), 1, actor=actor, hf_src=hf_dir, trainer_state={"step": 1}, keep_last=1,
                        layout={"world_size": dims.world_size, "tp": dims.tp, "pp": dims.pp, "cp": dims.cp})
    return result


if __name__ == "__main__":
    worker_main(run)
