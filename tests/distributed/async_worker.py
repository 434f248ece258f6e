"""One rank of a toy run (run by test_disaggregated.py under torchrun): the real loop, colocated or
disaggregated, from the `toy_cpu` recipe plus dotted overrides given on the command line. The trainer
leader writes the final HF-named weights to <run dir>/final_weights.pt."""

from __future__ import annotations

import sys

import torch

from megatron_speed.recipes import load_recipe


def main() -> None:
    from megatron_speed.setup import build
    from megatron_speed.trainer import Trainer

    recipe, overrides = sys.argv[1], sys.argv[2:]
    parts = build(load_recipe(recipe, overrides))
    try:
        Trainer(parts).fit()
        if parts.actor is not None:
            weights = {n: t.detach().clone() for n, t in parts.actor.export_hf_weights()}
            if parts.dims.is_main:
                torch.save(weights, parts.out_dir / "final_weights.pt")
    finally:
        parts.close()


if __name__ == "__main__":
    main()
