"""Loading and validating the config tree: errors name the dotted key, value, rule and fix.

Tests pass a `Config` instance to `load_config` instead of a recipe name, so they do not depend on
the recipes module.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megatron_speed.config.base import ConfigError, to_dict
from megatron_speed.config.loader import load_config, parse_overrides
from megatron_speed.config.schema import Config, DataConfig, OptimConfig, RolloutConfig, ToyTaskConfig


def base() -> Config:
    """A valid small config: toy data, 32 prompts x 8 = 256 trajectories/step, mini-batches of 32."""
    return Config(data=DataConfig(toy=ToyTaskConfig()),
                  optim=OptimConfig(mini_batch_size=32, micro_batch_size=16))


def load_error(*overrides: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(base(), list(overrides))
    return info.value


def test_base_config_is_valid_and_overrides_apply() -> None:
    config = load_config(base(), ["rollout.n=4", "run.name=exp", "data.toy.seed=3"])
    assert config.rollout.n == 4 and config.run.name == "exp" and config.data.toy is not None
    assert config.data.toy.seed == 3
    assert load_config(base()) == base()


# ---------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(("override", "key", "suggestion"), [
    ("rollot.n=4", "rollot", "did you mean rollout?"),
    ("rollout.temprature=0.7", "rollout.temprature", "did you mean rollout.temperature?"),
    ("data.toy.max_digit=3", "data.toy.max_digit", "did you mean data.toy.max_digits?"),
])
def test_unknown_key_names_dotted_key_and_close_match(override: str, key: str, suggestion: str) -> None:
    err = load_error(override)
    assert err.key == key
    assert str(err).startswith(key + " ")
    assert "is not a config key" in str(err) and suggestion in str(err)


def test_unknown_key_without_close_match_lists_known_keys() -> None:
    err = load_error("optim.zzzzzz=1")
    assert err.key == "optim.zzzzzz" and "known keys:" in str(err) and "mini_batch_size" in str(err)


# ---------------------------------------------------------------- wrong types


@pytest.mark.parametrize(("override", "key", "expected_type"), [
    ("rollout.n=abc", "rollout.n", "must be int"),
    ("rollout.temperature=[1]", "rollout.temperature", "must be float"),
    ("rollout.n=2.5", "rollout.n", "must be int"),
    ("rollout.n=true", "rollout.n", "must be int"),
    ("metrics.tensorboard=1", "metrics.tensorboard", "must be bool"),
    ("data.train_files=a.jsonl", "data.train_files", "must be a list of str"),
    ("algorithm.advantage=ppo", "algorithm.advantage", "must be one of 'rloo'"),
    ("model.params_dtype=fp16", "model.params_dtype", "must be one of 'float32', 'bfloat16'"),
    ("rollout=3", "rollout", "must be RolloutConfig"),
])
def test_wrong_type_names_key_and_expected_type(override: str, key: str, expected_type: str) -> None:
    err = load_error(override)
    assert err.key == key
    assert str(err).startswith(key + " (")
    assert expected_type in str(err)


def test_int_is_accepted_for_float() -> None:
    config = load_config(base(), ["rollout.temperature=1"])
    assert config.rollout.temperature == 1.0 and isinstance(config.rollout.temperature, float)


@pytest.mark.parametrize(("raw", "value"),
                         [("1e-6", 1e-6), ("3E-5", 3e-5), ("2e-3", 2e-3), ("1.5e-4", 1.5e-4)])
def test_exponent_floats_without_a_dot_are_floats(raw: str, value: float, tmp_path: Path) -> None:
    # Plain YAML 1.1 reads "1e-6" as a string; learning rates are written this way.
    assert load_config(base(), [f"optim.lr={raw}", f"optim.min_lr={raw}"]).optim.lr == value
    path = tmp_path / "run.yaml"
    path.write_text(f"optim:\n  lr: {raw}\n  min_lr: 0\n")
    assert load_config(base(), yaml_path=path).optim.lr == value


# ---------------------------------------------------------------- impossible values


@pytest.mark.parametrize(("overrides", "key", "value", "words"), [
    (["rollout.n=0"], "rollout.n", "(0)", ["must be >= 1"]),
    (["rollout.n=1"], "rollout.n", "(1)", ["leave-one-out", "rollout.n=2"]),
    (["rollout.temperature=0"], "rollout.temperature", "(0.0)", ["must be > 0", "use 1.0"]),
    (["optim.min_lr=1e-3"], "optim.min_lr", "(0.001)",
     ["must be in [0, lr=0.0001]", "optim.min_lr <= optim.lr"]),
    (["optim.mini_batch_size=96"], "optim.mini_batch_size", "(96)",
     ["must divide the trajectories per step", "256", "pick a mini-batch size"]),
    (["optim.mini_batch_size=40"], "optim.mini_batch_size", "(40)", ["multiple of micro_batch_size (16)"]),
    (["rollout.top_p=1.5"], "rollout.top_p", "(1.5)", ["must be in (0, 1]"]),
    (["data.toy.max_digits=12"], "data.toy.max_digits", "(12)", ["must be in 1..9"]),
    (["data.toy=null"], "data.train_files", "(())", ["no toy task", "data.train_files=[path.jsonl]"]),
])
def test_impossible_value_names_key_value_and_fix(overrides: list[str], key: str, value: str,
                                                   words: list[str]) -> None:
    err = load_error(*overrides)
    message = str(err)
    assert err.key == key
    assert message.startswith(f"{key} {value} ")
    assert ": " in message and err.fix  # a rule, then a fix
    for word in words:
        assert word in message


def test_error_message_format() -> None:
    err = load_error("rollout.n=0")
    assert str(err) == "rollout.n (0) must be >= 1: sample at least one response per prompt"


def test_bad_override_syntax() -> None:
    err = load_error("rollout.n")
    assert "key=value" in str(err)
    err = load_error("rollout.n=4", "rollout.n.x=1")
    assert err.key == "rollout.n.x"


# ---------------------------------------------------------------- YAML, ordering, lists, null


def test_yaml_then_overrides_later_wins(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("rollout:\n  n: 4\n  temperature: 0.7\nrun:\n  name: from_yaml\n"
                    "curriculum:\n  prompts_per_step: 16\n")
    config = load_config(base(), ["rollout.n=16", "rollout.n=2"], yaml_path=path)
    assert config.rollout.n == 2  # the last override wins over the first and over YAML
    assert config.rollout.temperature == 0.7  # from YAML
    assert config.run.name == "from_yaml"
    assert config.curriculum.prompts_per_step == 16
    assert config.rollout.top_p == 1.0  # untouched by either


def test_yaml_errors_name_dotted_keys(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("rollout:\n  nn: 4\n")
    with pytest.raises(ConfigError, match=r"rollout\.nn .*did you mean rollout\.n\?"):
        load_config(base(), yaml_path=path)
    path.write_text("- rollout\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(base(), yaml_path=path)


def test_empty_yaml_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(base(), yaml_path=path) == base()


def test_list_values_become_tuples(tmp_path: Path) -> None:
    config = load_config(base(), ["data.train_files=[a.jsonl,b.jsonl]"])
    assert config.data.train_files == ("a.jsonl", "b.jsonl")
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  eval_files: [c.jsonl]\n")
    assert load_config(base(), yaml_path=path).data.eval_files == ("c.jsonl",)
    assert to_dict(config)["data"]["train_files"] == ["a.jsonl", "b.jsonl"]


def test_toy_null_with_real_files() -> None:
    overrides = ["data.train_files=[a.jsonl]", "data.toy=null", "model.hf_path=/models/qwen"]
    config = load_config(base(), overrides)
    assert config.data.toy is None and config.model.hf_path == "/models/qwen"


def test_toy_null_with_the_toy_model_is_rejected() -> None:
    err = load_error("data.train_files=[a.jsonl]", "data.toy=null")
    assert err.key == "model.hf_path" and "data.toy is not set" in str(err)


def test_toy_section_is_created_from_null() -> None:
    start = load_config(base(), ["data.train_files=[a.jsonl]", "data.toy=null", "model.hf_path=/m"])
    config = load_config(start, ["data.toy.seed=5"])
    assert config.data.toy == ToyTaskConfig(seed=5)


def test_parse_overrides_nests_and_parses_yaml_scalars() -> None:
    tree = parse_overrides(["rollout.n=8", "data.toy.seed=3", "data.toy=null", "run.name=", "a.b=[1, x]"])
    assert tree == {"rollout": {"n": 8}, "data": {"toy": None}, "run": {"name": ""}, "a": {"b": [1, "x"]}}


# ---------------------------------------------------------------- immutability


def test_configs_are_frozen() -> None:
    config = load_config(base(), ["rollout.n=4"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rollout.n = 16  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rollout = RolloutConfig()  # type: ignore[misc]


def test_loading_does_not_mutate_its_input() -> None:
    start = base()
    load_config(start, ["rollout.n=4", "optim.lr=1e-3", "optim.min_lr=1e-3"])
    assert start == base()


def test_constructing_a_section_directly_validates() -> None:
    with pytest.raises(ConfigError, match=r"^n \(0\) must be >= 1"):
        RolloutConfig(n=0)
    with pytest.raises(ConfigError, match="train_files"):
        Config()
