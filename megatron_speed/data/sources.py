"""The papers' datasets in their published schemas, turned into our one prompt-file schema.

Every source becomes rows of `(id, prompt, answer, source)` (what `data/dataset.py` reads), whatever
shape it is published in. Each `Source` names where its schema was read, so a changed upstream card
is easy to check against:

- deepscaler: agentica-org/DeepScaleR-Preview-Dataset, `deepscaler.json`, a JSON array of
  `{problem, solution, answer}` (dataset card and the rllm/verl preprocessors that read it).
- dapo17k: BytedTsinghua-SIA/DAPO-Math-17k, `data/dapo-math-17k.parquet` in verl's RL layout:
  `data_source`, `prompt` = `[{role: "user", content}]` with DAPO's "Answer:" instructions wrapped
  around the problem, `ability`, `reward_model` = `{style, ground_truth}`, `extra_info` = `{index}`.
  The published file repeats each problem many times; duplicates are dropped.
- numinamath: AI-MO/NuminaMath-CoT (`source, problem, solution, messages`) or AI-MO/NuminaMath-1.5
  (`problem, solution, answer, problem_type, question_type, ..., source, synthetic`). The gold answer is
  the last `\\boxed{}` of the solution (the 1.5 `answer` column when there is none), kept only when
  math-verify parses it to a constant: a number or an expression without free symbols.
- math500: HuggingFaceH4/MATH-500, `test` split: `problem, solution, answer, subject, level, unique_id`.
- amc23: AI-MO/aimo-validation-amc (`id, problem, answer` (a float), `url`), all 83 rows: AMC 12
  2022 and 2023, the set the SPEED-RL and JSPO papers evaluate as "AMC23" (their metrics count 83
  problems: 22/83 at mean@1, 79/332 at mean@4). A file in math-ai/amc23's schema (`question`, no
  `problem`) is refused with `SourceMismatch`: it holds only the 40 AMC 2023 problems (amc2023).
- amc2023: the 40 AMC 2023 problems: the aimo-validation-amc rows whose url names 2023 (as
  SkyThought's AMC23 task selects them), or math-ai/amc23 (`id, question, answer`; all 2023).
- aime24: HuggingFaceH4/aime_2024 (`id, problem, solution, answer, url, year`) or
  Maxwell-Jia/AIME_2024 (`ID, Problem, Solution, Answer`).
- aime25: opencompass/AIME2025, configs `AIME2025-I` and `AIME2025-II`, `{question, answer}` jsonl,
  or yentinglin/aime_2025 (`id, problem, solution, answer, url, year`).

A bad row raises `RowError` with a reason (counted by the caller, with file and row); a row that
shows the whole file is another dataset raises `SourceMismatch` (the caller stops). Deliberately
left out: downloading (see `examples/data_preprocess/prepare.py`) and anything tokenizer-specific
beyond applying a chat template to the finished prompt text.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."

MISSING_PROBLEM = "missing_problem"
MISSING_ANSWER = "missing_answer"
NO_BOXED_ANSWER = "no_boxed_answer"
UNVERIFIABLE_ANSWER = "unverifiable_answer"
NOT_SELECTED = "not_in_subset"

# DAPO-Math-17k wraps each problem in instructions for its "Answer: ..." format; we use \boxed{}.
_DAPO_PREFIX = ("Solve the following math problem step by step. The last line of your response should be "
                "of the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.")
_DAPO_SUFFIX = 'Remember to put your answer on its own line after "Answer:".'


class RowError(ValueError):
    """A row that cannot become a prompt; `reason` is the counter it is reported under."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class SourceMismatch(ValueError):
    """The input is another dataset than the one asked for (not one bad row): preparing must stop."""


@dataclass(frozen=True)
class Problem:
    """One verifiable problem before prompt formatting; `key` is the source's own id, if it has one."""

    key: str
    problem: str
    answer: str


@dataclass(frozen=True)
class Source:
    """How one published dataset maps onto `Problem`s, and where to fetch it from a hub."""

    name: str
    parse: Callable[[Mapping[str, Any]], Problem]
    hub: str
    hub_configs: tuple[str | None, ...] = (None,)
    split: str = "train"
    expected: int | None = None  # problems in the published set, where it is a fixed benchmark


def _field(row: Mapping[str, Any], *names: str) -> Any:
    """The first of `names` present and non-null in `row` (sources differ in capitalisation)."""
    for name in names:
        if row.get(name) is not None:
            return row[name]
    return None


def answer_text(value: Any) -> str:
    """A gold answer as text: `27.0` -> `"27"` (AMC answers are published as floats), strings stripped."""
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip() if isinstance(value, (str, int, float)) else ""


def _problem(row: Mapping[str, Any], *, key_fields: Sequence[str] = ("id", "ID", "unique_id"),
             problem_fields: Sequence[str] = ("problem", "Problem", "question"),
             answer_fields: Sequence[str] = ("answer", "Answer")) -> Problem:
    """The common case: a problem column, an answer column, an optional id column."""
    problem = _field(row, *problem_fields)
    if not isinstance(problem, str) or not problem.strip():
        raise RowError(MISSING_PROBLEM, f"none of {', '.join(problem_fields)} holds text")
    answer = answer_text(_field(row, *answer_fields))
    if not answer:
        raise RowError(MISSING_ANSWER, f"none of {', '.join(answer_fields)} holds an answer")
    key = _field(row, *key_fields)
    return Problem(key="" if key is None else str(key), problem=problem.strip(), answer=answer)


def last_boxed(text: str) -> str | None:
    """The contents of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[brace + 1:i].strip()
    return None


def is_constant_answer(answer: str) -> bool:
    """True when math-verify parses `answer` to a number or an expression without free symbols.

    That rejects multiple-choice letters, equations, intervals, sets and proofs, which a numeric
    grader cannot check reliably. Runs math-verify in this thread (its parse timeout uses signals,
    so call it from the main thread)."""
    import math_verify
    import sympy

    parsed = math_verify.parse(f"${answer}$")
    if not parsed:
        return False
    value = parsed[0]
    return isinstance(value, sympy.Expr) and not value.free_symbols


def parse_deepscaler(row: Mapping[str, Any]) -> Problem:
    return _problem(row)


def parse_dapo(row: Mapping[str, Any]) -> Problem:
    """DAPO's chat prompt, its "Answer:" instructions removed, and `reward_model.ground_truth`."""
    messages = row.get("prompt")
    content = None
    if isinstance(messages, list) and messages and isinstance(messages[0], Mapping):
        content = messages[0].get("content")
    elif isinstance(messages, str):
        content = messages
    if not isinstance(content, str) or not content.strip():
        raise RowError(MISSING_PROBLEM, "prompt[0].content holds no text")
    problem = content.strip().removeprefix(_DAPO_PREFIX).removesuffix(_DAPO_SUFFIX).strip()
    reward = row.get("reward_model")
    answer = answer_text(reward.get("ground_truth") if isinstance(reward, Mapping) else None)
    if not answer:
        raise RowError(MISSING_ANSWER, "reward_model.ground_truth is missing or empty")
    extra = row.get("extra_info")
    key = extra.get("index") if isinstance(extra, Mapping) else None
    return Problem(key="" if key is None else str(key), problem=problem, answer=answer)


def parse_numina(row: Mapping[str, Any]) -> Problem:
    """The solution's last boxed answer (or the 1.5 `answer` column), kept only if it is a constant."""
    problem = row.get("problem")
    if not isinstance(problem, str) or not problem.strip():
        raise RowError(MISSING_PROBLEM, "problem holds no text")
    solution = row.get("solution")
    answer = last_boxed(solution) if isinstance(solution, str) else None
    if not answer:
        answer = answer_text(row.get("answer")) or None
    if not answer:
        raise RowError(NO_BOXED_ANSWER, "the solution has no \\boxed{} answer")
    if not is_constant_answer(answer):
        raise RowError(UNVERIFIABLE_ANSWER, f"answer {answer[:40]!r} is not a number or constant expression")
    return Problem(key="", problem=problem.strip(), answer=answer)


def _is_math_ai_amc23(row: Mapping[str, Any]) -> bool:
    """math-ai/amc23 names its problem column `question`; aimo-validation-amc names it `problem`."""
    return row.get("problem") is None and row.get("question") is not None


def parse_amc23(row: Mapping[str, Any]) -> Problem:
    """Every aimo-validation-amc row (AMC 2022 and 2023): the papers' 83-problem "AMC23"."""
    if _is_math_ai_amc23(row):
        raise SourceMismatch(
            "this file is in math-ai/amc23's schema (`question`), which holds only the 40 AMC 2023 "
            "problems; amc23 is the papers' 83-problem AMC 2022 + 2023 set, AI-MO/aimo-validation-amc "
            "(`id, problem, answer, url`): pass that file, or prepare this one as amc2023")
    return _problem(row)


def parse_amc2023(row: Mapping[str, Any]) -> Problem:
    """The AMC 2023 problems: aimo-validation-amc rows whose url names 2023, or any math-ai/amc23 row."""
    if not _is_math_ai_amc23(row):
        url = row.get("url")
        if not isinstance(url, str) or "2023" not in url:
            raise RowError(NOT_SELECTED, f"url {url!r} does not name an AMC 2023 problem")
    return _problem(row)


SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("deepscaler", parse_deepscaler, hub="agentica-org/DeepScaleR-Preview-Dataset"),
    Source("dapo17k", parse_dapo, hub="BytedTsinghua-SIA/DAPO-Math-17k"),
    Source("numinamath", parse_numina, hub="AI-MO/NuminaMath-CoT"),
    Source("math500", _problem, hub="HuggingFaceH4/MATH-500", split="test", expected=500),
    Source("amc23", parse_amc23, hub="AI-MO/aimo-validation-amc", expected=83),
    Source("amc2023", parse_amc2023, hub="AI-MO/aimo-validation-amc", expected=40),
    Source("aime24", _problem, hub="HuggingFaceH4/aime_2024", expected=30),
    Source("aime25", _problem, hub="opencompass/AIME2025", hub_configs=("AIME2025-I", "AIME2025-II"),
           split="test", expected=30),
)}


def file_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """`(row number, raw row)` from a `.jsonl` (line numbers), `.json` array or `.parquet` file.

    A `.jsonl` line that is not JSON is yielded as an `Exception` so the caller can count it."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open("rb") as f:
            for row, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield row, json.loads(line)
                    except ValueError as exc:
                        yield row, exc
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON array of rows, got {type(data).__name__}")
        yield from enumerate(data, start=1)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for raw in batch.to_pylist():
                row += 1
                yield row, raw
    else:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}: use .jsonl, .json or .parquet")


def hub_rows(source: Source) -> Iterator[tuple[int, Any]]:
    """Rows of the source's hub dataset, numbered from 1 across its configs (needs `datasets` and network)."""
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("loading from the hub needs `pip install datasets`; or pass --input FILE") from exc
    row = 0
    for config in source.hub_configs:
        for raw in datasets.load_dataset(source.hub, config, split=source.split):
            row += 1
            yield row, raw


def heldout_rank(problem: str, seed: int) -> str:
    """A stable pseudo-random sort key: the held-out split does not depend on row order or Python's hash."""
    return hashlib.sha256(f"{seed}:{problem}".encode()).hexdigest()
