"""Missing model folders and prompt files stop a run at validation, naming the path, what moves it and
what makes it, before any process group or engine exists (preflight.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from megatron_speed import setup
from megatron_speed.config import ConfigError
from megatron_speed.launch import job
from megatron_speed.launch.cli import main
from megatron_speed.preflight import MissingPathsError, check_paths
from megatron_speed.recipes import load_recipe
from tests.tiny_models import tiny_hf_model

RECIPE = "speed_rloo__qwen2.5-math-1.5b__deepscaler"
EVAL_SETS = ("aime24", "aime25", "amc23", "math500", "dapo17k_heldout")


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    models, data = tmp_path / "models", tmp_path / "data"
    monkeypatch.setenv("MEGATRON_SPEED_MODEL_DIR", str(models))
    monkeypatch.setenv("MEGATRON_SPEED_DATA_DIR", str(data))
    return models, data


def test_missing_paper_model_and_data_stop_the_launch(dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    models, data = dirs
    started: list[str] = []  # whether a process group existed before depends on the tests run earlier in this process
    monkeypatch.setattr(setup, "init_parallel", lambda *a, **k: started.append("init_parallel"))
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: started.append("init_process_group"))
    assert main([RECIPE]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("config error: ")]
    assert len(lines) == 2 + len(EVAL_SETS), err  # model, train file, every eval set: all at once
    model_line = lines[0]
    assert f"model.hf_path ('{models / 'Qwen2.5-Math-1.5B'}') does not exist" in model_line
    assert "model.hf_path=/path/to/Qwen2.5-Math-1.5B" in model_line
    assert f"MEGATRON_SPEED_MODEL_DIR (now '{models}')" in model_line
    assert f"data.train_files ('{data / 'deepscaler.parquet'}') does not exist" in lines[1]
    assert f"python examples/data_preprocess/prepare.py deepscaler --out-dir {data}" in lines[1]
    assert "MEGATRON_SPEED_DATA_DIR" in lines[1] and "data.train_files=[" in lines[1]
    for name, line in zip(EVAL_SETS, lines[2:]):
        assert line.startswith(f"config error: eval.files ('{data / name}.parquet') does not exist"), line
        assert "eval.data_dir" in line
    assert "prepare.py dapo17k --out-dir" in lines[-1]  # the held-out split comes with dapo17k
    assert "Traceback" not in err and not started  # nothing started
    assert job.main([RECIPE]) == 2  # the job entry (under torchrun) stops every rank the same way
    assert "model.hf_path" in capsys.readouterr().err and not started


def test_present_paths_pass_and_the_pipeline_split_is_checked_against_the_model(dirs: tuple[Path, Path]) -> None:
    models, data = dirs
    tiny_hf_model("qwen2", models / "Qwen2.5-Math-1.5B", num_hidden_layers=3, tokenizer=False)
    data.mkdir()
    for name in ("deepscaler", *EVAL_SETS):
        (data / f"{name}.parquet").write_bytes(b"")
    check_paths(load_recipe(RECIPE))
    with pytest.raises(ConfigError, match=r"^parallel\.pipeline_parallel_size \(2\) .*3 layers.*"
                                          r"num_layers_in_first_pipeline_stage=1"):
        check_paths(load_recipe(RECIPE, ["parallel.pipeline_parallel_size=2"]))
    check_paths(load_recipe(RECIPE, ["parallel.pipeline_parallel_size=2",
                                     "parallel.num_layers_in_first_pipeline_stage=1"]))


def test_a_folder_without_config_and_a_missing_user_file(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    cfg = load_recipe("toy_cpu", [f"model.hf_path={tmp_path / 'empty'}",
                                  f"data.train_files=[{tmp_path / 'mine.jsonl'}]"])
    with pytest.raises(MissingPathsError) as caught:
        check_paths(cfg)
    first, second = caught.value.problems
    assert first.key == "model.hf_path" and "without config.json" in first.rule
    assert second.key == "data.train_files" and second.value == str(tmp_path / "mine.jsonl")
    assert "prepare.py" not in second.fix  # not a prepared dataset's name
    check_paths(load_recipe("toy_cpu"))  # the toy writes its own model and prompts


def test_toy_train_files_replace_the_generated_split(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`data.train_files=[my.jsonl]` on a toy recipe trains on that file alone (the held-out split stays
    the toy's); listing the generated file too uses both; `data.eval_files` replaces the held-out split."""
    from megatron_speed.setup import prepare_data

    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"id": "a", "prompt": " 12+  30=", "answer": "42"}\n')
    run_dir = tmp_path / "toy_cpu"
    toy_train, toy_eval = run_dir / "data" / "toy_train.jsonl", run_dir / "data" / "toy_eval.jsonl"
    overrides = [f"run.output_dir={tmp_path}", "data.toy.train_size=50", "data.toy.eval_size=10"]
    with caplog.at_level("INFO", logger="megatron_speed"):
        train, held_out = prepare_data(load_recipe("toy_cpu", [*overrides, f"data.train_files=[{mine}]"]), run_dir)
    assert (train, held_out) == ((str(mine),), (str(toy_eval),))
    assert "data.train_files is set: it replaces the toy task's generated train split" in caplog.text
    assert f"data.train_files=[{mine},{toy_train}]" in caplog.text  # how to use both
    both = load_recipe("toy_cpu", [*overrides, f"data.train_files=[{mine},{toy_train}]"])
    check_paths(both)  # the generated file is written by the run itself
    assert prepare_data(both, run_dir)[0] == (str(mine), str(toy_train))
    assert len(toy_train.read_text().splitlines()) == 50
    own_eval = prepare_data(load_recipe("toy_cpu", [*overrides, f"data.eval_files=[{mine}]"]), run_dir)
    assert own_eval == ((str(toy_train),), (str(mine),))
