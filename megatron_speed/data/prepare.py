"""Turn a source's raw rows into prompt rows `(id, prompt, answer, source)` and write them as parquet.

The steps, in order: parse each row with its `Source` (a bad row is counted by reason with its file
and row number, in the same `SkipReport` the training reader uses), drop repeated problems and ids,
format the prompt (problem + instruction, optionally through the policy tokenizer's chat template),
and, for DAPO-17k, set aside a deterministic held-out split. The output is exactly what
`data/dataset.py` reads, so a prepared file can go straight into `data.train_files` or `eval.files`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_speed.data.dataset import SkipReport
from megatron_speed.data.sources import INSTRUCTION, Problem, RowError, Source, heldout_rank

INVALID_ROW = "invalid_row"
DUPLICATE_PROBLEM = "duplicate_problem"
DUPLICATE_ID = "duplicate_id"

COLUMNS = ("id", "prompt", "answer", "source")


@dataclass(frozen=True)
class PromptRow:
    id: str
    prompt: str
    answer: str
    source: str


def format_prompt(problem: str, *, instruction: str = INSTRUCTION, tokenizer: Any = None) -> str:
    """`problem + " " + instruction`; with a tokenizer, wrapped as one user turn of its chat template.

    Base models get the raw text (the papers' Qwen2.5-Math base runs); instruct/R1-distilled models
    get their own template with the generation prompt appended, so the engine can encode it as is."""
    text = f"{problem.strip()} {instruction}".strip()
    if tokenizer is None:
        return text
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def parse_rows(source: Source, rows: Iterable[tuple[int, Any]], file_label: str,
               report: SkipReport) -> list[Problem]:
    """Parse every row; skip and count bad ones, repeated problems and repeated source ids.

    A problem without an id of its own is keyed by its row number, which stays put when other rows
    turn out bad (a position among the kept rows would not)."""
    problems: list[Problem] = []
    seen_problems: set[str] = set()
    seen_keys: set[str] = set()
    for row, raw in rows:
        report.rows += 1
        if not isinstance(raw, dict):
            report.add(file_label, row, INVALID_ROW)
            continue
        try:
            problem = source.parse(raw)
        except RowError as err:
            report.add(file_label, row, err.reason)
            continue
        if problem.problem in seen_problems:
            report.add(file_label, row, DUPLICATE_PROBLEM)
            continue
        if problem.key and problem.key in seen_keys:
            report.add(file_label, row, DUPLICATE_ID)
            continue
        seen_problems.add(problem.problem)
        seen_keys.add(problem.key)
        problems.append(problem if problem.key else dataclasses.replace(problem, key=str(row)))
        report.kept += 1
    return problems


def to_prompt_rows(problems: list[Problem], name: str, *, instruction: str = INSTRUCTION,
                   tokenizer: Any = None) -> list[PromptRow]:
    """Ids are `<name>-<source id or row number>`, unique across the prepared sets."""
    return [PromptRow(id=f"{name}-{p.key}", prompt=format_prompt(p.problem, instruction=instruction,
                                                                       tokenizer=tokenizer),
                      answer=p.answer, source=name)
            for p in problems]


def split_heldout(problems: list[Problem], size: int, *, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """`(train, held_out)`: the `size` problems with the smallest hash of `(seed, problem text)` are held out.

    Deterministic for a given set of problems whatever their order, and stable when rows are added
    (a problem's key never changes); both lists keep the input order."""
    if size < 0 or size >= len(problems):
        raise ValueError(f"held-out size {size} must be in [0, {len(problems)}) for {len(problems)} problems")
    chosen = set(sorted(range(len(problems)), key=lambda i: heldout_rank(problems[i].problem, seed))[:size])
    train = [p for i, p in enumerate(problems) if i not in chosen]
    return train, [p for i, p in enumerate(problems) if i in chosen]


def write_parquet(rows: list[PromptRow], path: Path) -> Path:
    """Write the prompt rows (all four columns as strings) to `path`, creating its folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({c: pa.array([getattr(r, c) for r in rows], type=pa.string()) for c in COLUMNS})
    pq.write_table(table, path)
    return path
