"""Dataset preparation: each source's fixture (its published schema, with bad rows) through the real CLI.

Fixtures under tests/fixtures/data/ are small files in each dataset's own layout; the outputs must be
exactly what the training reader accepts in strict mode, with bad rows counted by reason and located
by file and row.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from megatron_speed.data import read_many
from megatron_speed.data.prepare import split_heldout
from megatron_speed.data.sources import INSTRUCTION, Problem, is_constant_answer, last_boxed

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "data"


def _cli() -> ModuleType:
    spec = importlib.util.spec_from_file_location("prepare_cli", ROOT / "examples" / "data_preprocess" / "prepare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PREPARE = _cli()

# dataset -> (fixture, kept prompts with their answers, skipped counts by reason)
CASES = {
    "deepscaler": ("deepscaler.json", {"deepscaler-1": "4", "deepscaler-2": "\\frac{3}{4}", "deepscaler-3": "4",
                                       "deepscaler-6": "6"},
                   {"missing_problem": 2, "missing_answer": 1}),
    "numinamath": ("numinamath.jsonl", {"numinamath-1": "2", "numinamath-2": "\\frac{1}{2}",
                                        "numinamath-6": "2\\sqrt{2}", "numinamath-7": "\\frac{3}{2}"},
                   {"unverifiable_answer": 3, "no_boxed_answer": 1}),
    "math500": ("math500.jsonl", {"math500-test/precalculus/807.json": "\\left( 3, \\frac{\\pi}{2} \\right)",
                                  "math500-test/algebra/1.json": "1024", "math500-test/algebra/2.json": "2\\sqrt{3}"},
                {"missing_answer": 1, "duplicate_id": 1, "invalid_row": 1}),
    "amc23": ("amc23.jsonl", {"amc23-0": "27", "amc23-1": "0.5", "amc23-2": "3", "amc23-4": "144"},
              {"missing_answer": 1}),
    "amc2023": ("amc23.jsonl", {"amc2023-0": "27", "amc2023-1": "0.5", "amc2023-4": "144"},
                {"not_in_subset": 1, "missing_answer": 1}),
    "aime24": ("aime24.jsonl", {"aime24-2024-I-1": "204", "aime24-2024-I-2": "25", "aime24-2024-II-4": "33"},
               {"missing_problem": 1, "missing_answer": 1}),
    "aime25": ("aime25.jsonl", {"aime25-1": "70", "aime25-2": "117", "aime25-3": "504"},
               {"missing_problem": 1, "missing_answer": 1, "invalid_row": 1}),
}


@pytest.mark.parametrize("dataset", sorted(CASES))
def test_each_source_prepares_and_reads_back(dataset: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fixture, expected, skipped = CASES[dataset]
    assert PREPARE.main([dataset, "--input", str(FIXTURES / fixture), "--out-dir", str(tmp_path)]) == 0
    records, report = read_many([tmp_path / f"{dataset}.parquet"], strict=True)
    assert {r.uid: r.answer for r in records} == expected
    assert {r.source for r in records} == {dataset} and report.skipped == 0
    assert all(r.prompt.endswith(" " + INSTRUCTION) and not r.prompt.startswith(" ") for r in records)
    summary = json.loads((tmp_path / f"{dataset}.report.json").read_text())
    assert summary["skipped"] == skipped and summary["kept"] == len(expected)
    assert summary["rows"] == len(expected) + sum(skipped.values())
    assert all(e["file"] == fixture and e["row"] >= 1 for e in summary["examples"])
    assert f"{fixture} row " in capsys.readouterr().out


def test_amc23_is_the_papers_83_problem_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """aimo-validation-amc's schema, 2022 and 2023 rows interleaved: amc23 keeps all 83 (no size
    warning), amc2023 the rows whose url names 2023."""
    fixture = FIXTURES / "aimo_validation_amc.jsonl"
    rows = [json.loads(line) for line in fixture.read_text().splitlines()]
    assert len(rows) == 83 and all(isinstance(r["answer"], float) for r in rows)
    rows_2023 = {str(r["id"]) for r in rows if "/2023_AMC_" in r["url"]}
    assert len(rows_2023) == 40 and {str(r["id"]) for r in rows if "/2022_AMC_" in r["url"]}.isdisjoint(rows_2023)
    prepared = {}
    for name in ("amc23", "amc2023"):
        assert PREPARE.main([name, "--input", str(fixture), "--out-dir", str(tmp_path)]) == 0
        prepared[name], _ = read_many([tmp_path / f"{name}.parquet"], strict=True)
        assert "warning" not in capsys.readouterr().err
    assert len(prepared["amc23"]) == 83
    assert {r.uid for r in prepared["amc2023"]} == {f"amc2023-{i}" for i in rows_2023}
    answers = {r.uid.removeprefix("amc23-"): r.answer for r in prepared["amc23"]}
    assert answers["0"] == "0" and answers["5"] == "0.5" and answers["17"] == "2.25" and answers["3"] == "111"
    assert json.loads((tmp_path / "amc2023.report.json").read_text())["skipped"] == {"not_in_subset": 43}


def test_amc_size_other_than_published_is_flagged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert PREPARE.main(["amc23", "--input", str(FIXTURES / "amc23.jsonl"), "--out-dir", str(tmp_path)]) == 0
    assert "warning: amc23 has 83 problems as published (AI-MO/aimo-validation-amc); amc23.jsonl gave 4" in \
        capsys.readouterr().err


def test_math_ai_amc23_is_the_2023_set_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """math-ai/amc23 (`id, question, answer`) holds the 40 AMC 2023 problems: amc2023 reads it, and
    amc23 (the papers' 83) refuses it, saying what to pass instead, and writes nothing."""
    fixture = FIXTURES / "math_ai_amc23.jsonl"
    assert PREPARE.main(["amc2023", "--input", str(fixture), "--out-dir", str(tmp_path)]) == 0
    records, _ = read_many([tmp_path / "amc2023.parquet"], strict=True)
    assert {r.uid: r.answer for r in records} == {"amc2023-0": "27", "amc2023-1": "0.5", "amc2023-2": "144"}
    capsys.readouterr()
    assert PREPARE.main(["amc23", "--input", str(fixture), "--out-dir", str(tmp_path / "amc23")]) == 2
    err = capsys.readouterr().err
    assert "math_ai_amc23.jsonl is not the amc23 dataset" in err
    assert "AI-MO/aimo-validation-amc" in err and "prepare this one as amc2023" in err
    assert not (tmp_path / "amc23").exists()


def test_bad_rows_are_located_by_file_and_row(tmp_path: Path) -> None:
    PREPARE.main(["math500", "--input", str(FIXTURES / "math500.jsonl"), "--out-dir", str(tmp_path)])
    examples = json.loads((tmp_path / "math500.report.json").read_text())["examples"]
    assert [(e["row"], e["reason"]) for e in examples] == [(4, "missing_answer"), (5, "duplicate_id"),
                                                           (6, "invalid_row")]


def test_dapo_strips_its_answer_format_dedups_and_holds_out(tmp_path: Path) -> None:
    args = ["dapo17k", "--input", str(FIXTURES / "dapo17k.jsonl"), "--out-dir", str(tmp_path), "--heldout-size", "3"]
    assert PREPARE.main(args) == 0
    train, _ = read_many([tmp_path / "dapo17k.parquet"], strict=True)
    held, _ = read_many([tmp_path / "dapo17k_heldout.parquet"], strict=True)
    assert len(train) == 5 and len(held) == 3
    assert not {r.prompt for r in train} & {r.prompt for r in held}
    every = train + held
    assert all(r.prompt.startswith("Compute ") and "Answer:" not in r.prompt for r in every)
    assert {r.uid.split("-", 1)[1] for r in every} == {f"uuid-{i:02d}" for i in range(1, 9)}
    assert {r.source for r in held} == {"dapo17k_heldout"}
    skipped = json.loads((tmp_path / "dapo17k.report.json").read_text())["skipped"]
    assert skipped == {"duplicate_problem": 1, "missing_answer": 1, "missing_problem": 1}


def test_dapo_reads_its_published_parquet_layout(tmp_path: Path) -> None:
    """The hub file is parquet with nested prompt/reward_model/extra_info columns: same result as jsonl."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIXTURES / "dapo17k.jsonl").read_text().splitlines()]
    rows[-1]["prompt"] = [{"content": "", "role": "user"}]  # parquet columns need one type per column
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "dapo-math-17k.parquet")
    for name, source in (("jsonl", FIXTURES / "dapo17k.jsonl"), ("parquet", tmp_path / "dapo-math-17k.parquet")):
        out = tmp_path / name
        assert PREPARE.main(["dapo17k", "--input", str(source), "--out-dir", str(out), "--heldout-size", "2"]) == 0
    for split in ("dapo17k", "dapo17k_heldout"):
        assert read_many([tmp_path / "jsonl" / f"{split}.parquet"]) [0] == \
            read_many([tmp_path / "parquet" / f"{split}.parquet"])[0]


def test_heldout_split_is_deterministic_and_order_free() -> None:
    problems = [Problem(key=str(i), problem=f"problem {i}", answer=str(i)) for i in range(200)]
    train, held = split_heldout(problems, 50, seed=0)
    assert len(held) == 50 and len(train) == 150 and not set(train) & set(held)
    _, held_reversed = split_heldout(problems[::-1], 50, seed=0)
    assert set(held_reversed) == set(held)
    _, other_seed = split_heldout(problems, 50, seed=1)
    assert set(other_seed) != set(held)
    _, grown = split_heldout([*problems, Problem(key="new", problem="a new one", answer="1")], 50, seed=0)
    assert len(set(grown) & set(held)) >= 49  # adding a row moves at most one problem out
    with pytest.raises(ValueError, match="held-out size"):
        split_heldout(problems[:10], 10)


def test_chat_template_wraps_the_prompt(tmp_path: Path) -> None:
    from megatron_speed.toy.tokenizer import build_toy_tokenizer

    tokenizer = build_toy_tokenizer(tmp_path / "tok")
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tokenizer.save_pretrained(tmp_path / "tok")
    args = ["aime25", "--input", str(FIXTURES / "aime25.jsonl"), "--out-dir", str(tmp_path / "out"),
            "--chat-template", "--tokenizer", str(tmp_path / "tok")]
    assert PREPARE.main(args) == 0
    records, _ = read_many([tmp_path / "out" / "aime25.parquet"], strict=True)
    assert records[0].prompt == ("<|user|>Find the sum of all integer bases $b>9$ for which $17_b$ divides $97_b$. "
                                 f"{INSTRUCTION}\n<|assistant|>")


def test_cli_rejects_inconsistent_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        PREPARE.main(["aime25", "--input", str(FIXTURES / "aime25.jsonl"), "--out-dir", str(tmp_path),
                      "--chat-template"])
    assert "--chat-template needs --tokenizer" in capsys.readouterr().err
    assert PREPARE.main(["dapo17k", "--input", str(FIXTURES / "dapo17k.jsonl"), "--out-dir", str(tmp_path)]) == 2
    assert "--heldout-size 1000" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "boxed"), [
    ("so $\\boxed{4}$.", "4"),
    ("first \\boxed{1}, finally \\boxed{\\frac{3}{2}}", "\\frac{3}{2}"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\fbox{7}", "7"),
    ("no box here", None),
    ("\\boxed{unclosed", None),
])
def test_last_boxed(text: str, boxed: str | None) -> None:
    assert last_boxed(text) == boxed


@pytest.mark.parametrize(("answer", "ok"), [
    ("2", True), ("-4", True), ("3.5", True), ("\\frac{1}{2}", True), ("2\\sqrt{2}", True), ("2\\pi", True),
    ("\\textbf{(B)}", False), ("x=2", False), ("[0, 1)", False), ("n+1", False), ("proof", False), ("1,2", False),
])
def test_constant_answers(answer: str, ok: bool) -> None:
    assert is_constant_answer(answer) is ok
