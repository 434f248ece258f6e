"""The prompt reader skips and counts every kind of bad row; the sampler is deterministic and resumable."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_speed.data import DataError, PromptRecord, PromptSampler, SkipReport, read_many, read_prompts
from megatron_speed.data.dataset import (
    DUPLICATE_ID,
    EMPTY_PROMPT,
    INVALID_JSON,
    MISSING_ANSWER,
    PROMPT_NOT_TEXT,
    PROMPT_TOO_LONG,
)


def write_jsonl(path: Path, rows: list[object | str]) -> Path:
    """Rows given as str are written verbatim (to plant broken lines); others as JSON."""
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    return path


def count_words(text: str) -> int:
    return len(text.split())


GOOD = {"id": "g1", "prompt": "What is 2+2?", "answer": "4"}
BAD_ROWS = [  # (row, reason); rows are the 1-based line numbers of BAD_FILE
    (2, INVALID_JSON),
    (3, MISSING_ANSWER),
    (4, MISSING_ANSWER),
    (5, EMPTY_PROMPT),
    (6, EMPTY_PROMPT),
    (7, PROMPT_TOO_LONG),
    (8, DUPLICATE_ID),
    (9, INVALID_JSON),
    (10, PROMPT_NOT_TEXT),
]
BAD_FILE = [
    GOOD,
    '{"id": "x", "prompt": "unterminated',
    {"id": "a1", "prompt": "p"},
    {"id": "a2", "prompt": "p", "answer": "   "},
    {"id": "p1", "prompt": "", "answer": "1"},
    {"id": "p2", "answer": "1"},
    {"id": "long", "prompt": "one two three four five six", "answer": "1"},
    {"id": "g1", "prompt": "again", "answer": "4"},
    '"just a string"',
    {"id": "chat", "prompt": [{"role": "user", "content": "hi"}], "answer": "1"},
    {"uid": "u1", "prompt": "What is 3*3?", "answer": 9, "source": "mult"},
]


@pytest.fixture
def bad_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "mixed.jsonl", BAD_FILE)


def test_each_bad_row_is_skipped_and_counted(bad_file: Path) -> None:
    records, report = read_prompts(bad_file, count_tokens=count_words, max_prompt_tokens=5, strict=False)
    assert [r.uid for r in records] == ["g1", "u1"]
    assert records[1] == PromptRecord(uid="u1", prompt="What is 3*3?", answer="9", source="mult")
    expected: dict[str, int] = {}
    for _, reason in BAD_ROWS:
        expected[reason] = expected.get(reason, 0) + 1
    assert report.counts == expected
    assert (report.rows, report.kept, report.skipped) == (11, 2, len(BAD_ROWS))
    assert report.examples == [("mixed.jsonl", row, reason) for row, reason in BAD_ROWS[:5]]
    summary = report.summary()
    assert "kept 2 of 11 rows" in summary and "missing_answer=2" in summary
    assert "mixed.jsonl row 2: invalid_json" in summary


@pytest.mark.parametrize(("row", "reason"), BAD_ROWS)
def test_strict_mode_names_file_row_and_reason(tmp_path: Path, row: int, reason: str) -> None:
    """The bad row follows a good row and a blank line, so it is line 3 (a duplicate repeats GOOD's id)."""
    path = write_jsonl(tmp_path / "one_bad.jsonl", [GOOD, "", BAD_FILE[row - 1]])
    with pytest.raises(DataError) as info:
        read_prompts(path, count_tokens=count_words, max_prompt_tokens=5, strict=True)
    message = str(info.value)
    assert str(path) in message and "row 3:" in message and reason in message


def test_long_prompts_are_kept_without_a_limit(bad_file: Path) -> None:
    records, report = read_prompts(bad_file, count_tokens=count_words, max_prompt_tokens=None, strict=False)
    assert "long" in {r.uid for r in records} and PROMPT_TOO_LONG not in report.counts
    with pytest.raises(ValueError, match="count_tokens"):
        read_prompts(bad_file, count_tokens=None, max_prompt_tokens=5, strict=False)


def test_jsonl_round_trip(tmp_path: Path) -> None:
    original = [PromptRecord(uid=f"q{i}", prompt=f"What is {i}+{i}?\nThink.", answer=str(2 * i),
                             source="doubles") for i in range(50)]
    rows = [{"id": r.uid, "prompt": r.prompt, "answer": r.answer, "source": r.source} for r in original]
    records, report = read_prompts(write_jsonl(tmp_path / "d.jsonl", rows), count_tokens=None,
                                   max_prompt_tokens=None, strict=True)
    assert records == original
    assert report.summary() == "kept 50 of 50 rows; none skipped"


def test_missing_ids_and_sources_are_derived_stably(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "answer": "1"}, "", {"prompt": "b", "answer": "2"}]
    path = write_jsonl(tmp_path / "noids.jsonl", rows)
    first, _ = read_prompts(path, count_tokens=None, max_prompt_tokens=None, strict=True)
    again, _ = read_prompts(path, count_tokens=None, max_prompt_tokens=None, strict=True)
    assert [r.uid for r in first] == ["noids.jsonl:1", "noids.jsonl:3"] == [r.uid for r in again]
    assert {r.source for r in first} == {"noids"}


def test_read_many_concatenates_and_dedups_across_files(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [GOOD, {"id": "a2", "prompt": "p", "answer": "1"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "b1", "prompt": "q", "answer": "2"}, GOOD])
    records, report = read_many([a, b])
    assert [r.uid for r in records] == ["g1", "a2", "b1"]
    assert report.counts == {DUPLICATE_ID: 1} and report.examples == [("b.jsonl", 2, DUPLICATE_ID)]


def test_unsupported_files_and_missing_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match=r"\.jsonl or \.parquet"):
        read_prompts(tmp_path / "d.csv")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        read_prompts(tmp_path / "d.parquet")


def test_skip_report_keeps_only_the_first_examples() -> None:
    report = SkipReport(max_examples=2)
    for row in range(1, 6):
        report.add("f.jsonl", row, EMPTY_PROMPT)
    assert report.counts == {EMPTY_PROMPT: 5} and [e[1] for e in report.examples] == [1, 2]


def make_records(n: int) -> list[PromptRecord]:
    return [PromptRecord(uid=str(i), prompt=f"p{i}", answer=str(i)) for i in range(n)]


def uids(records: list[PromptRecord]) -> list[str]:
    return [r.uid for r in records]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 12), seed=st.integers(0, 2**31), shuffle=st.booleans(),
       before=st.lists(st.integers(0, 30), max_size=6), after=st.lists(st.integers(0, 30), max_size=6))
def test_restored_sampler_continues_identically(n: int, seed: int, shuffle: bool, before: list[int],
                                                after: list[int]) -> None:
    records = make_records(n)
    original = PromptSampler(records, seed=seed, shuffle=shuffle)
    for k in before:
        original.next(k)
    state = json.loads(json.dumps(original.state_dict()))
    assert all(type(v) is int for v in state.values())
    restored = PromptSampler(records, seed=seed, shuffle=shuffle)
    restored.load_state_dict(state)
    assert restored.epoch == original.epoch
    assert [uids(restored.next(k)) for k in after] == [uids(original.next(k)) for k in after]


def test_sampler_is_deterministic_under_a_seed() -> None:
    records = make_records(20)
    draw = [uids(PromptSampler(records, seed=7).next(50)) for _ in range(2)]
    assert draw[0] == draw[1]
    assert uids(PromptSampler(records, seed=8).next(50)) != draw[0]
    assert uids(PromptSampler(records, seed=7, shuffle=False).next(25)) == [str(i % 20) for i in range(25)]


def test_every_record_once_per_epoch_and_epochs_reshuffle() -> None:
    records = make_records(13)
    sampler = PromptSampler(records, seed=3)
    stream = uids(sampler.next(5)) + uids(sampler.next(13)) + uids(sampler.next(21))
    assert sampler.epoch == 3
    epochs = [stream[i:i + 13] for i in range(0, 39, 13)]
    assert all(sorted(epoch, key=int) == [str(i) for i in range(13)] for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3


def test_sampler_rejects_mismatched_state() -> None:
    sampler = PromptSampler(make_records(5), seed=1)
    with pytest.raises(ValueError, match="seed"):
        PromptSampler(make_records(5), seed=2).load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="num_records"):
        PromptSampler(make_records(6), seed=1).load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="empty"):
        PromptSampler([], seed=1)
