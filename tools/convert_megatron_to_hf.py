"""Convert a megatron-speed checkpoint (from the converter or the trainer) into an HF folder.

    python tools/convert_megatron_to_hf.py --ckpt runs/toy_cpu/checkpoints --out hf/toy_step60
    torchrun --nproc-per-node 2 tools/convert_megatron_to_hf.py --ckpt ckpt/qwen-tp2 --out hf/qwen --tp 2

A LoRA trainer checkpoint (adapters only) is merged onto the base model its meta.json names;
`--peft-out DIR` also writes the adapters as a PEFT folder.

`--ckpt` is a checkpoint directory, a checkpoints folder or a run directory (the latest complete
checkpoint is taken). The checkpoint loads at any `--tp/--pp` (dist-checkpointing reshards), with
or without uneven end stages (`--first-stage-layers/--last-stage-layers`, whatever split wrote it); the
HF folder gets config, tokenizer files (when the source had them) and `model.safetensors`, loadable
by `transformers` and vLLM. The work is `megatron_speed.checkpoint.convert.megatron_to_hf`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the sibling helper importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import run_in_layout
else:
    from tools._common import run_in_layout


def main(argv: list[str] | None = None) -> int:
    from megatron_speed.checkpoint.convert import megatron_to_hf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="checkpoint, checkpoints folder or run dir")
    parser.add_argument("--out", type=Path, required=True, help="HF folder to write (replaced atomically)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to load at")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to load at")
    parser.add_argument("--first-stage-layers", type=int, default=None,
                        help="layers on the first pipeline stage (uneven split; default: even)")
    parser.add_argument("--last-stage-layers", type=int, default=None,
                        help="layers on the last pipeline stage (uneven split; default: even)")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size to load at (MoE models)")
    parser.add_argument("--peft-out", type=Path, default=None,
                        help="LoRA checkpoints: also write the adapters here as a PEFT folder")
    args = parser.parse_args(argv)
    return run_in_layout("convert_megatron_to_hf", args.tp, args.pp,
                         lambda: megatron_to_hf(args.ckpt, args.out, tp=args.tp, pp=args.pp,
                                              first_stage_layers=args.first_stage_layers,
                                              last_stage_layers=args.last_stage_layers, ep=args.ep,
                                              peft_out=args.peft_out),
                         ep=args.ep)


if __name__ == "__main__":
    sys.exit(main())
