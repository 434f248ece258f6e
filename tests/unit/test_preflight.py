"""Missing model folders and prompt files stop a run at validation, naming the path, what moves it and
what makes it, before any process group or engine exists (preflight.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from megatron_speed.config import ConfigError, load_config
from megatron_speed.launch import job
from megatron_speed.launch.cli import main
from megatron_speed.preflight import MissingPathsError, check_paths
from tests.tiny_models import tiny_hf_model

RECIPE = "speed_rloo__qwen2.5-math-1.5b__deepscaler"
EVAL_SETS = ("aime24", "aime25", "amc23", "math500", "dapo17k_heldout")


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    models, data = tmp_path / "models", tmp_path / "data"
    monkeypatch.setenv("MEGATRON_SPEED_MODEL_DIR", str(models))
    monkeypatch.setenv("MEGATRON_SPEED_DATA_DIR", str(data))
    return models, data


def test_missing_paper_model_and_data_stop_the_launch(dirs: tuple[Path, Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    models, data = dirs
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
    assert "Traceback" not in err and not dist.is_initialized()  # nothing started
    assert job.main([RECIPE]) == 2  # the job entry (under torchrun) stops every rank the same way
    assert "model.hf_path" in capsys.readouterr().err and not dist.is_initialized()


def test_present_paths_pass_and_the_pipeline_split_is_checked_against_the_model(dirs: tuple[Path, Path]) -> None:
    models, data = dirs
    tiny_hf_model("qwen2", models / "Qwen2.5-Math-1.5B", num_hidden_layers=3, tokenizer=False)
    data.mkdir()
    for name in ("deepscaler", *EVAL_SETS):
        (data / f"{name}.parquet").write_bytes(b"")
    check_paths(load_config(RECIPE))
    with pytest.raises(ConfigError, match=r"^parallel\.pipeline_parallel_size \(2\) .*3 layers.*"
                                          r"num_layers_in_first_pipeline_stage=1"):
        check_paths(load_config(RECIPE, ["parallel.pipeline_parallel_size=2"]))
    check_paths(load_config(RECIPE, ["parallel.pipeline_parallel_size=2",
                                     "parallel.num_layers_in_first_pipeline_stage=1"]))


def test_a_folder_without_config_and_a_missing_user_file(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    cfg = load_config("toy_cpu", [f"model.hf_path={tmp_path / 'empty'}",
                                  f"data.train_files=[{tmp_path / 'mine.jsonl'}]"])
    with pytest.raises(MissingPathsError) as caught:
        check_paths(cfg)
    first, second = caught.value.problems
    assert first.key == "model.hf_path" and "without config.json" in first.rule
    assert second.key == "data.train_files" and second.value == str(tmp_path / "mine.jsonl")
    assert "prepare.py" not in second.fix  # not a prepared dataset's name
    check_paths(load_config("toy_cpu"))  # the toy writes its own model and prompts
