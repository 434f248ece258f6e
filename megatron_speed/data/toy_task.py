"""The embedded verifiable task: sums of small integers, written so a tiny model can learn them.

A prompt is the operands right-aligned in fixed-width fields, joined by '+', ending in '=':
`' 355+2057='` for `max_digits=4`. Every prompt of a config therefore has the same length (so a
batch of prompts needs no padding). The answer is the plain sum ("2412") and the target response is
`\\boxed{2412}` followed by the tokenizer's end-of-sequence token, most-significant digit first.

Difficulty is set by the number of carries, not the number of digits: each operand's digit count is
uniform in 1..max_digits, and `count_carries` recovers the carries of a problem for per-difficulty
breakdowns. The held-out split is drawn first as a set of distinct prompts; the train split is then
drawn from the same distribution with those prompts rejected, so no prompt text is in both splits
(the train split may repeat its own prompts). Both are pure functions of the config.

Deliberately left out: subtraction/multiplication and worked chains of thought; the answer is a
single boxed number so that math-verify grades it exactly like a real math answer.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from megatron_speed.config.schema import ToyTaskConfig
from megatron_speed.records import PromptRecord

SOURCE = "toy-add"
BOX_OPEN = "\\boxed{"
BOX_CLOSE = "}"
_SPLIT_SALT = {"eval": 1, "train": 2}
_BOXED = re.compile(r"^\\boxed\{(\d+)\}$")


def count_carries(operands: Sequence[int]) -> int:
    """Number of digit columns (least significant first) that pass a non-zero carry to the next."""
    carries, carry = 0, 0
    values = [int(v) for v in operands]
    while any(values) or carry:
        column = carry + sum(v % 10 for v in values)
        carry = column // 10
        carries += carry > 0
        values = [v // 10 for v in values]
    return carries


def format_prompt(operands: Sequence[int], max_digits: int) -> str:
    """`' 355+2057='`: each operand right-aligned in a field of `max_digits` characters."""
    return "+".join(str(v).rjust(max_digits) for v in operands) + "="


def parse_operands(prompt: str) -> list[int]:
    """Inverse of `format_prompt`: the operands of a toy prompt."""
    return [int(field) for field in prompt.rstrip("=").split("+")]


def solution_text(record: PromptRecord) -> str:
    """The target response without the end-of-sequence token: `\\boxed{<answer>}`."""
    return f"{BOX_OPEN}{record.answer}{BOX_CLOSE}"


def is_correct(response: str, record: PromptRecord) -> bool:
    """Exact-match grade: the response (end-of-sequence token already stripped) is the solution.

    A local stand-in for the math-verify reward used to calibrate and test the warm start; it is
    stricter only on leading zeros (`\\boxed{012}` is wrong here, right for math-verify).
    """
    match = _BOXED.match(response.strip())
    return match is not None and match.group(1) == record.answer


def _sample_operands(rng: random.Random, cfg: ToyTaskConfig) -> list[int]:
    """Operands with a uniform digit count in 1..max_digits, then uniform within that count."""
    operands = []
    for _ in range(cfg.num_operands):
        digits = rng.randint(1, cfg.max_digits)
        low = 0 if digits == 1 else 10 ** (digits - 1)
        operands.append(rng.randint(low, 10**digits - 1))
    return operands


def _record(operands: Sequence[int], cfg: ToyTaskConfig, split: str, index: int) -> PromptRecord:
    return PromptRecord(uid=f"toy-{split}-{index:06d}", prompt=format_prompt(operands, cfg.max_digits),
                        answer=str(sum(operands)), source=SOURCE)


def _eval_prompts(cfg: ToyTaskConfig) -> list[list[int]]:
    """`eval_size` distinct problems, in draw order (the config check keeps this feasible)."""
    rng = random.Random(cfg.seed * 1000 + _SPLIT_SALT["eval"])
    seen: set[tuple[int, ...]] = set()
    problems = []
    while len(problems) < cfg.eval_size:
        operands = _sample_operands(rng, cfg)
        if tuple(operands) not in seen:
            seen.add(tuple(operands))
            problems.append(operands)
    return problems


def make_problems(cfg: ToyTaskConfig, split: Literal["train", "eval"]) -> list[PromptRecord]:
    """The `split` of the task: deterministic from `cfg.seed`, and the two splits share no prompt."""
    held_out = _eval_prompts(cfg)
    if split == "eval":
        return [_record(ops, cfg, "eval", i) for i, ops in enumerate(held_out)]
    if split != "train":
        raise ValueError(f"split ({split!r}) must be 'train' or 'eval'")
    excluded = {tuple(ops) for ops in held_out}
    rng = random.Random(cfg.seed * 1000 + _SPLIT_SALT["train"])
    records: list[PromptRecord] = []
    while len(records) < cfg.train_size:
        operands = _sample_operands(rng, cfg)
        if tuple(operands) not in excluded:
            records.append(_record(operands, cfg, "train", len(records)))
    return records


def write_jsonl(records: Iterable[PromptRecord], path: Path) -> Path:
    """Write `records` as jsonl rows {id, prompt, answer, source}, the schema the readers take.

    Atomically (a temporary file, then a rename): every rank of a run writes the same splits, and a
    rank reading the file while another rewrites it must see a whole file, never a torn one (seen:
    2017 of 20000 rows read, the ranks' samplers diverged)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"id": r.uid, "prompt": r.prompt, "answer": r.answer, "source": r.source}) + "\n")
    os.replace(tmp, path)
    return path
