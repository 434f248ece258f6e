"""One rank of the tensor/pipeline-parallel actor checks (run by test_tp_pp.py under torchrun, or
called in-process as the single-rank TP=1 reference).

Every rank builds the actor for the requested layout, then on the same full batch: exports the HF
weights, computes log-probs, takes one training step, exports again and recomputes log-probs. Each
rank writes what it returned to `<out>.<rank>.pt`, so the test can check both that the layout matches
the reference and that every rank returned the same full results.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron_speed.config.schema import AlgorithmConfig, ModelConfig, OptimConfig, ParallelConfig
from megatron_speed.parallel import destroy_parallel, init_parallel

ROWS, WIDTH = 8, 14


def fixed_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8 right-padded rows whose responses end at very different positions (lengths 4..13)."""
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, vocab, (ROWS, WIDTH), generator=gen)
    mask = torch.zeros(ROWS, WIDTH - 1)
    for i in range(ROWS):
        mask[i, 2:2 + 1 + (i * 7) % 11] = 1.0
    adv = torch.randn(ROWS, 1, generator=gen) * mask
    return tokens, mask, adv


def _grad(param: torch.nn.Parameter) -> torch.Tensor:
    grad = getattr(param, "main_grad", None)  # megatron's DDP accumulates into main_grad
    return (grad if grad is not None else param.grad).detach().to(param.dtype)


def hf_grads(actor: Any) -> dict[str, torch.Tensor]:
    """The gradients the last step used, as FULL HF-named tensors, the same on every rank: the weight
    export (`export_hf_weights`) run on each parameter's gradient instead of its value, so TP shards are
    gathered (GLU interleave undone, fused QKV split), experts gathered over EP under their global
    indices, and pipeline stages broadcast. Collective. Not with the distributed optimizer, whose grad
    buffer holds reduce-scattered shards after the step."""
    from megatron_speed.bridge.weights import export_hf_weights

    return {name: grad.clone() for name, grad in export_hf_weights(actor.chunks, actor.mapping, _grad)}


def run(hf_dir: Path, layout: dict[str, Any]) -> dict[str, Any]:
    """The actor's outputs for one layout: {"logprobs", "stats", "grads", "logprobs_after", "before",
    "after"} ("grads" by HF name, absent with the distributed optimizer)."""
    from megatron_speed.actor.actor import MegatronActor
    from megatron_speed.bridge.weights import bare_chunks

    parallel = ParallelConfig(tensor_parallel_size=layout.get("tp", 1), pipeline_parallel_size=layout.get("pp", 1),
                              virtual_pipeline_parallel_size=layout.get("vpp", 1),
                              num_layers_in_first_pipeline_stage=layout.get("first"),
                              num_layers_in_last_pipeline_stage=layout.get("last"),
                              expert_parallel_size=layout.get("ep", 1),
                              expert_tensor_parallel_size=layout.get("etp", 0))
    dims = init_parallel(parallel, seed=1)
    optim = OptimConfig(lr=1e-3, min_lr=1e-3, micro_batch_size=2, mini_batch_size=ROWS,
                        micro_batch_tokens=layout.get("micro_batch_tokens", 0),
                        use_distributed_optimizer=layout.get("distributed_optimizer", False))
    actor = MegatronActor(hf_dir, model_cfg=ModelConfig(), optim_cfg=optim,
                          algorithm_cfg=AlgorithmConfig(), temperature=1.0, horizon=WIDTH - 1, total_steps=1,
                          tp=dims.tp, pp=dims.pp, first_stage_layers=parallel.num_layers_in_first_pipeline_stage,
                          last_stage_layers=parallel.num_layers_in_last_pipeline_stage)
    tokens, mask, adv = fixed_batch(actor.hf_config.vocab_size)
    before = {k: v.clone() for k, v in actor.export_hf_weights()}
    logprobs = actor.compute_logprobs(tokens)
    stats = actor.train_step(tokens, mask, logprobs - 0.05 * mask, adv)
    grads = {} if optim.use_distributed_optimizer else {"grads": hf_grads(actor)}
    after = {k: v.clone() for k, v in actor.export_hf_weights()}
    return {"logprobs": logprobs, "stats": stats, **grads, "logprobs_after": actor.compute_logprobs(tokens),
            "before": before, "after": after, "dims": dims, "layers_per_stage": actor.layers_per_stage,
            "local_layers": sum(len(chunk.decoder.layers) for chunk in bare_chunks(actor.chunks))}


def worker_main(run: Callable[[Path, dict[str, Any]], dict[str, Any]]) -> None:
    """`python WORKER HF_DIR OUT LAYOUT_JSON` under torchrun: each rank saves `run`'s result (its "dims"
    removed) to OUT.<rank>.pt, then tears the process groups down. Shared by the layout workers."""
    parser = argparse.ArgumentParser()
    parser.add_argument("hf_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("layout", type=json.loads)
    args = parser.parse_args()
    result = run(args.hf_dir, args.layout)
    rank = result.pop("dims").rank
    torch.save(result, f"{args.out}.{rank}.pt")
    destroy_parallel()


if __name__ == "__main__":
    worker_main(run)
