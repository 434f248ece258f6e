#!/usr/bin/env python3
"""Prepare one of the papers' datasets as `<out-dir>/<name>.parquet` with columns (id, prompt, answer, source).

    python examples/data_preprocess/prepare.py DATASET [--input FILE] --out-dir DIR
                                               [--chat-template --tokenizer DIR]

DATASET is one of deepscaler, dapo17k, numinamath, math500, amc23, amc2023, aime24, aime25 (schemas
and their sources: megatron_speed/data/sources.py; amc23 is the papers' 83-problem AMC 2022 + 2023
set, amc2023 its 40 AMC 2023 problems). `--input` reads a local .jsonl/.json/.parquet in the
dataset's published schema; without it the dataset is loaded from the hub with `datasets` (not a
dependency of this project). dapo17k writes two files: dapo17k.parquet (training) and
dapo17k_heldout.parquet (`--heldout-size` prompts, chosen by a hash of the problem text, so the
split does not change with row order). Bad rows (missing fields, empty or unverifiable answers,
duplicates) are skipped; the counts per reason and the first rows' file and row numbers are printed
and written to `<out-dir>/<name>.report.json`. An input that is another dataset altogether (e.g.
math-ai/amc23's 40 problems given as amc23) stops with an error, and a benchmark that comes out at
another size than its published one (amc23 83, amc2023 40, math500 500, aime24/25 30) gets a warning.

Prompts are the problem followed by `--instruction` (default: "Let's think step by step and output
the final answer within \\boxed{}."). With `--chat-template` the text becomes one user turn of the
tokenizer's chat template (`--tokenizer` = the policy's HF folder); without it, raw text for base models.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from megatron_speed.data.dataset import SkipReport
from megatron_speed.data.prepare import parse_rows, split_heldout, to_prompt_rows, write_parquet
from megatron_speed.data.sources import INSTRUCTION, SOURCES, SourceMismatch, file_rows, hub_rows


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(SOURCES), help="which dataset's schema to read")
    parser.add_argument("--input", type=Path, default=None, help="local .jsonl/.json/.parquet (default: the hub)")
    parser.add_argument("--out-dir", type=Path, required=True, help="folder for <name>.parquet")
    parser.add_argument("--chat-template", action="store_true", help="apply the tokenizer's chat template")
    parser.add_argument("--tokenizer", type=Path, default=None, help="HF folder whose chat template to apply")
    parser.add_argument("--instruction", default=INSTRUCTION, help="text appended to every problem")
    parser.add_argument("--heldout-size", type=int, default=1000, help="dapo17k: prompts held out")
    parser.add_argument("--seed", type=int, default=0, help="dapo17k: seed of the held-out hash")
    args = parser.parse_args(argv)
    if args.chat_template and args.tokenizer is None:
        parser.error("--chat-template needs --tokenizer DIR (the policy's HF folder)")
    if args.tokenizer is not None and not args.chat_template:
        parser.error("--tokenizer is only used with --chat-template")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    source = SOURCES[args.dataset]
    tokenizer = None
    if args.chat_template:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        if not tokenizer.chat_template:
            print(f"error: {args.tokenizer} has no chat template; drop --chat-template for a base model",
                  file=sys.stderr)
            return 2
    label = args.input.name if args.input else f"hf:{source.hub}"
    rows = file_rows(args.input) if args.input else hub_rows(source)
    report = SkipReport(max_examples=20)
    try:
        problems = parse_rows(source, rows, label, report)
    except SourceMismatch as err:
        print(f"error: {label} is not the {source.name} dataset: {err}", file=sys.stderr)
        return 2
    if source.expected is not None and len(problems) != source.expected:
        print(f"warning: {source.name} has {source.expected} problems as published ({source.hub}); "
              f"{label} gave {len(problems)}", file=sys.stderr)
    splits = {source.name: problems}
    if source.name == "dapo17k":
        if not 0 <= args.heldout_size < len(problems):
            print(f"error: --heldout-size {args.heldout_size} must be below the {len(problems)} usable problems",
                  file=sys.stderr)
            return 2
        train, held_out = split_heldout(problems, args.heldout_size, seed=args.seed)
        splits = {"dapo17k": train, "dapo17k_heldout": held_out}
    written = {}
    for name, part in splits.items():
        path = write_parquet(to_prompt_rows(part, name, instruction=args.instruction, tokenizer=tokenizer),
                             args.out_dir / f"{name}.parquet")
        written[name] = {"path": str(path), "prompts": len(part)}
        print(f"{name}: wrote {len(part)} prompts to {path}")
    print(f"{label}: {report.summary()}")
    (args.out_dir / f"{source.name}.report.json").write_text(json.dumps(
        {"input": label, "rows": report.rows, "kept": report.kept, "skipped": report.counts,
         "examples": [{"file": f, "row": r, "reason": why} for f, r, why in report.examples],
         "outputs": written}, indent=2))
    if not problems:
        print(f"error: no usable rows in {label}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
