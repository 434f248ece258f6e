"""Convert an HF folder (config, safetensors, tokenizer) into a megatron-core dist-checkpoint.

    python tools/convert_hf_to_megatron.py --hf Qwen2.5-Math-1.5B --out ckpt/qwen-tp2 --tp 2 --pp 1
    torchrun --nproc-per-node 8 tools/convert_hf_to_megatron.py --hf Qwen3-4B --out ckpt/q3-pp8 --pp 8 \
        --first-stage-layers 3 --last-stage-layers 3        # 36 layers: 3 + 6 x 5 + 3
    (run under `torchrun --nproc-per-node tp*pp` when tp*pp > 1)

The output holds the model shards (`megatron/`), a copy of the source config and tokenizer
(`hf/`), `meta.json` and a COMPLETE marker; `tools/convert_megatron_to_hf.py` reverses it at any
layout. The work is `megatron_speed.checkpoint.convert.hf_to_megatron`.
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
    from megatron_speed.checkpoint.convert import hf_to_megatron

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", type=Path, required=True, help="HF model folder")
    parser.add_argument("--out", type=Path, required=True, help="new directory for the megatron checkpoint")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to write")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to write")
    parser.add_argument("--first-stage-layers", type=int, default=None,
                        help="layers on the first pipeline stage (uneven split; default: even)")
    parser.add_argument("--last-stage-layers", type=int, default=None,
                        help="layers on the last pipeline stage (uneven split; default: even)")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size to write (MoE models)")
    args = parser.parse_args(argv)
    return run_in_layout("convert_hf_to_megatron", args.tp, args.pp,
                         lambda: hf_to_megatron(args.hf, args.out, tp=args.tp, pp=args.pp,
                                              first_stage_layers=args.first_stage_layers,
                                              last_stage_layers=args.last_stage_layers, ep=args.ep),
                         ep=args.ep)


if __name__ == "__main__":
    sys.exit(main())
