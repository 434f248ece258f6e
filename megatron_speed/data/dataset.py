"""Read verifiable prompts from `.jsonl` or `.parquet` files into `PromptRecord`s.

Each row has `id` (or `uid`), `prompt`, `answer` and optionally `source`. A missing id becomes
`"<file name>:<row>"`, stable across runs; a missing source becomes the file's stem, so evaluation can
report per file. Numeric answers are kept as their text (`2412` -> `"2412"`). A bad row is either
skipped and counted by reason in a `SkipReport` (the default: one broken row in 17k should not stop
a run) or, with `strict=True`, stops the read with a `DataError` naming the file, the 1-based row and
the reason. Rows are numbered from 1: the line number in a `.jsonl` file (blank lines included, and
never reported), the row index in a `.parquet` file. Deliberately left out: chat-format prompts
(lists of messages) and templating, which belong to the rollout's tokenizer side.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_speed.records import PromptRecord

INVALID_JSON = "invalid_json"
EMPTY_PROMPT = "empty_prompt"
PROMPT_NOT_TEXT = "prompt_not_text"
MISSING_ANSWER = "missing_answer"
PROMPT_TOO_LONG = "prompt_too_long"
DUPLICATE_ID = "duplicate_id"

_PARQUET_COLUMNS = ("id", "uid", "prompt", "answer", "source")


class DataError(ValueError):
    """A bad row in strict mode, or a file that cannot be read at all."""


@dataclass
class SkipReport:
    """How many rows were read and kept, skips counted per reason, and the first few examples."""

    rows: int = 0
    kept: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[tuple[str, int, str]] = field(default_factory=list)  # (file, row, reason)
    max_examples: int = 5

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def add(self, file: str, row: int, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < self.max_examples:
            self.examples.append((file, row, reason))

    def summary(self) -> str:
        """One line for the run log, e.g. `kept 98 of 100 rows; skipped 2 (missing_answer=2; ...)`."""
        head = f"kept {self.kept} of {self.rows} rows"
        if not self.counts:
            return f"{head}; none skipped"
        reasons = ", ".join(f"{reason}={n}" for reason, n in sorted(self.counts.items()))
        examples = ", ".join(f"{file} row {row}: {reason}" for file, row, reason in self.examples)
        return f"{head}; skipped {self.skipped} ({reasons}); first: {examples}"


@dataclass
class _Reader:
    """Turns raw rows into records, applying every rule in order; shared across the files of a read."""

    count_tokens: Callable[[str], int] | None
    max_prompt_tokens: int | None
    strict: bool
    report: SkipReport = field(default_factory=SkipReport)
    records: list[PromptRecord] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)

    def skip(self, path: Path, row: int, reason: str, detail: str) -> None:
        if self.strict:
            raise DataError(f"{path}: row {row}: {reason}: {detail} "
                            "(fix the row, or set data.strict=false to skip and count bad rows)")
        self.report.add(path.name, row, reason)

    def take(self, path: Path, row: int, raw: Any, error: str | None) -> None:
        """Keep `raw` as a record or skip it; `error` says why the row could not be parsed at all."""
        self.report.rows += 1
        if error is not None:
            return self.skip(path, row, INVALID_JSON, error)
        if not isinstance(raw, dict):
            return self.skip(path, row, INVALID_JSON, f"expected a JSON object, got {type(raw).__name__}")
        prompt = raw.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            return self.skip(path, row, PROMPT_NOT_TEXT, f"prompt is a {type(prompt).__name__}, not text")
        if not prompt or not prompt.strip():
            return self.skip(path, row, EMPTY_PROMPT, "prompt is missing or empty")
        answer = _text(raw.get("answer"))
        if not answer:
            return self.skip(path, row, MISSING_ANSWER, "answer is missing or empty")
        uid = _text(raw.get("id")) or _text(raw.get("uid")) or f"{path.name}:{row}"
        if uid in self.seen:
            return self.skip(path, row, DUPLICATE_ID, f"id {uid!r} appeared on an earlier row")
        if self.max_prompt_tokens is not None and self.count_tokens is not None:
            n = self.count_tokens(prompt)
            if n > self.max_prompt_tokens:
                return self.skip(path, row, PROMPT_TOO_LONG,
                                 f"prompt has {n} tokens > max_prompt_tokens {self.max_prompt_tokens}")
        source = _text(raw.get("source")) or path.stem
        self.seen.add(uid)
        self.records.append(PromptRecord(uid=uid, prompt=prompt, answer=answer, source=source))
        self.report.kept += 1


def _text(value: Any) -> str:
    """A scalar field as stripped text ("" for missing, None, booleans and containers)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return ""
    return str(value).strip()


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """`(line number, parsed object, parse error or None)` for every non-blank line."""
    with path.open("rb") as f:
        for row, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield row, json.loads(line), None
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
                yield row, None, f"not valid JSON ({exc})"


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """`(row number, row dict)` for every row, reading only the columns a prompt needs."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError(f"{path}: reading .parquet files needs pyarrow: pip install pyarrow "
                          "(or convert the file to .jsonl)") from exc
    parquet = pq.ParquetFile(path)
    columns = [name for name in _PARQUET_COLUMNS if name in parquet.schema_arrow.names]
    row = 0
    for batch in parquet.iter_batches(batch_size=4096, columns=columns):
        for raw in batch.to_pylist():
            row += 1
            yield row, raw, None


def _rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_rows(path)
    if suffix == ".parquet":
        return _parquet_rows(path)
    raise DataError(f"{path}: unsupported file type {path.suffix!r}: use .jsonl or .parquet")


def read_many(paths: Iterable[str | Path], *, count_tokens: Callable[[str], int] | None = None,
              max_prompt_tokens: int | None = None,
              strict: bool = False) -> tuple[list[PromptRecord], SkipReport]:
    """Records of every file in order, with ids unique across all of them (later duplicates skip).

    `max_prompt_tokens` needs `count_tokens` (usually the policy tokenizer's length of the
    templated prompt); a prompt with more tokens than that is skipped as `prompt_too_long`.
    """
    if max_prompt_tokens is not None and count_tokens is None:
        raise ValueError("max_prompt_tokens is set but count_tokens is None: pass the tokenizer's "
                         "token counter, or leave max_prompt_tokens=None")
    reader = _Reader(count_tokens=count_tokens, max_prompt_tokens=max_prompt_tokens, strict=strict)
    for path in map(Path, paths):
        for row, raw, error in _rows(path):
            reader.take(path, row, raw, error)
    return reader.records, reader.report


def read_prompts(path: str | Path, *, count_tokens: Callable[[str], int] | None = None,
                 max_prompt_tokens: int | None = None,
                 strict: bool = False) -> tuple[list[PromptRecord], SkipReport]:
    """Records of one `.jsonl` or `.parquet` file and the report of the rows skipped."""
    return read_many([path], count_tokens=count_tokens, max_prompt_tokens=max_prompt_tokens,
                     strict=strict)
