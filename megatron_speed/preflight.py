"""What a run reads from disk, checked before any process group, engine or model is built.

`check_paths(cfg)` looks at the policy's HF folder (`model.hf_path`), every prompt file
(`data.train_files`, `data.eval_files`, `eval.files` resolved under `eval.data_dir`) and, when the
model's config.json is there, whether the pipeline split fits its layer count. Every problem is
reported at once, each naming the path, the config key or environment variable that moves it, and
the command that makes it: a missing prepared dataset names `examples/data_preprocess/prepare.py`,
a missing paper model names `MEGATRON_SPEED_MODEL_DIR` (the paper recipes resolve their paths from
`MEGATRON_SPEED_MODEL_DIR` / `MEGATRON_SPEED_DATA_DIR` when they are built, see recipes/papers.py).

Without this a missing model folder surfaces from inside transformers as a hub connection error on
every rank. Deliberately left out: reading the files (the readers count bad rows), and what the
toy task writes itself (its model, and its generated splits even when listed in data.*_files).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from megatron_speed.config.base import ConfigError
from megatron_speed.config.schema import Config
from megatron_speed.data.sources import SOURCES
from megatron_speed.data.toy_task import split_file
from megatron_speed.evaluate import resolve_files
from megatron_speed.recipes.papers import DATA_DIR_ENV, MODEL_DIR_ENV

PREPARE = "python examples/data_preprocess/prepare.py"
_HELDOUT = "_heldout"  # dapo17k writes dapo17k_heldout beside dapo17k


class MissingPathsError(ConfigError):
    """One or more paths a run needs are missing; `problems` holds one ConfigError per path."""

    def __init__(self, problems: list[ConfigError]) -> None:
        first = problems[0]
        super().__init__(first.key, first.value, first.rule, first.fix)
        self.problems = problems
        self.args = ("\nconfig error: ".join(str(p) for p in problems),)

    def __str__(self) -> str:
        return str(self.args[0])


def _env_hint(path: Path, env: str, default: str) -> str:
    """`, or set ENV ...` when `path` sits in the folder ENV names (how the paper recipes build it)."""
    folder = os.environ.get(env, default)
    if path.parent != Path(folder):
        return ""
    state = f"now {folder!r}" if env in os.environ else f"unset, so {default!r}"
    return f", or set {env} ({state}) to the folder that holds {path.name}"


def _model_problem(cfg: Config) -> ConfigError | None:
    path = Path(cfg.model.hf_path)
    if cfg.model.hf_path == "toy" or (path / "config.json").is_file():
        return None
    rule = ("is a folder without config.json (not an HF model folder)" if path.is_dir() else
            "does not exist (a run never downloads a model)")
    return ConfigError("model.hf_path", str(path), rule,
                       "copy the model's HF folder there (config.json, *.safetensors, tokenizer files), or "
                       f"override model.hf_path=/path/to/{path.name}" + _env_hint(path, MODEL_DIR_ENV, "models"))


def _prepare_command(path: Path) -> str:
    """`prepare.py` for a prepared dataset's file name (`dapo17k_heldout` comes with `dapo17k`)."""
    name = path.stem.removesuffix(_HELDOUT)
    if name not in SOURCES:
        return ""
    return (f"prepare it: `{PREPARE} {name} --out-dir {path.parent} --input FILE` (FILE: the published data; "
            "without --input it is loaded from the hub through `datasets`), ")


def _file_problems(key: str, files: tuple[str, ...], *, mover: str, generated: set[Path]) -> list[ConfigError]:
    problems = []
    for entry in files:
        path = Path(entry)
        if path.is_file() or path.resolve() in generated:
            continue
        problems.append(ConfigError(key, str(path), "does not exist" if not path.exists() else "is not a file",
                                    _prepare_command(path) + mover + _env_hint(path, DATA_DIR_ENV, "data")))
    return problems


def _split_problem(cfg: Config) -> ConfigError | None:
    """The pipeline split against the model's layer count, read from its config.json."""
    if cfg.parallel.pipeline_parallel_size == 1 or cfg.model.hf_path == "toy":
        return None
    layers = json.loads((Path(cfg.model.hf_path) / "config.json").read_text()).get("num_hidden_layers")
    if not isinstance(layers, int):
        return None
    try:
        cfg.parallel.layers_per_stage(layers)
    except ConfigError as err:
        return err
    return None


def check_paths(cfg: Config) -> None:
    """Raise `MissingPathsError` listing every missing model folder and prompt file of `cfg`, or the
    ConfigError of a pipeline split that does not fit the model."""
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    generated = {split_file(run_dir, s).resolve() for s in ("train", "eval")} if cfg.data.toy is not None else set()
    problems = [p for p in [_model_problem(cfg)] if p is not None]
    problems += _file_problems("data.train_files", cfg.data.train_files, generated=generated,
                               mover="or override data.train_files=[path.jsonl,...]")
    problems += _file_problems("data.eval_files", cfg.data.eval_files, generated=generated,
                               mover="or override data.eval_files=[path.jsonl,...]")
    problems += _file_problems("eval.files", resolve_files(cfg.eval), generated=generated,
                               mover=f"or point eval.data_dir (now {cfg.eval.data_dir!r}) at the folder that "
                                     "holds it, or drop it from eval.files")
    if problems:
        raise MissingPathsError(problems)
    split = _split_problem(cfg)
    if split is not None:
        raise split
