"""Every registered recipe validates, and the paper recipes carry the papers' values.

The hand-checked entries below are read from reference/algorithms.md §1.5 (SPEED scripts) and
§2.5 (JSPO's run_math.sh), not from papers.py, so a changed constant in the recipes fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_speed.config.base import ConfigError
from megatron_speed.recipes import RECIPES, get_recipe, load_recipe
from megatron_speed.recipes.papers import DATA_DIR_ENV, MODEL_DIR_ENV, PAPER_RECIPES


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_validates(name: str) -> None:
    cfg = get_recipe(name)()
    cfg.check()
    assert load_recipe(name).run.name == name


def test_toy_recipes_grade_the_last_box_and_paper_recipes_the_whole_response() -> None:
    """Issue 11: the papers score with math-verify on the whole response; the toy keeps the last-box grader."""
    from megatron_speed.recipes.toy import TOY_RECIPES

    assert TOY_RECIPES and PAPER_RECIPES
    assert {name: f().rewards.grader for name, f in TOY_RECIPES.items()} == dict.fromkeys(TOY_RECIPES, "math_verify")
    assert {name: f().rewards.grader for name, f in PAPER_RECIPES.items()} == dict.fromkeys(PAPER_RECIPES,
                                                                                             "math_verify_response")


def test_paper_recipes_recompute_activations_as_upstream_checkpoints_gradients() -> None:
    """speed-rl's run_*.sh and JSPO's run_math.sh set verl's enable_gradient_checkpointing=True."""
    assert {f().model.recompute for f in PAPER_RECIPES.values()} == {"full"}


def test_grid_is_complete_and_named_consistently() -> None:
    grid = [n for n in PAPER_RECIPES if "qwen2.5-math" in n]
    assert len(grid) == 2 * 3 * 2 * 2 * 2
    for model in ("qwen2.5-math-1.5b", "qwen2.5-math-7b"):
        for data in ("numinamath", "dapo17k", "deepscaler"):
            for algo in ("rloo", "dapo", "rloo_js", "dapo_js", "speed_rloo", "speed_dapo", "speed_rloo_js",
                         "speed_dapo_js"):
                assert f"{algo}__{model}__{data}" in PAPER_RECIPES


def test_speed_rloo_7b_matches_run_fast_rloo_7b() -> None:
    cfg = get_recipe("speed_rloo__qwen2.5-math-7b__dapo17k")()
    assert cfg.curriculum.name == "speed"
    assert (cfg.curriculum.n_init, cfg.curriculum.n_continue) == (4, 20)
    assert (cfg.curriculum.prompts_per_step, cfg.curriculum.screen_prompts_per_call) == (16, 64)
    assert (cfg.optim.lr, cfg.optim.lr_warmup_steps, cfg.optim.weight_decay, cfg.optim.clip_grad) == (1e-6, 10, 0.1,
                                                                                                     1.0)
    assert (cfg.algorithm.advantage, cfg.algorithm.clip_low, cfg.algorithm.clip_high, cfg.algorithm.clip_c) == (
        "rloo", 0.2, 0.2, 10.0)
    assert cfg.algorithm.loss_aggregation == "token-mean" and cfg.algorithm.kl_coef == 0.0
    assert (cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p) == (3072, 1.0, 1.0)
    assert cfg.trajectories_per_step == 16 * 24
    assert cfg.eval.every == 25
    assert cfg.data.train_files[0].endswith("dapo17k.parquet")
    assert cfg.model.hf_path.endswith("Qwen2.5-Math-7B")


def test_baseline_and_dapo_variants() -> None:
    rloo = get_recipe("rloo__qwen2.5-math-1.5b__numinamath")()
    assert (rloo.curriculum.name, rloo.rollout.n, rloo.curriculum.prompts_per_step) == ("none", 24, 16)
    assert rloo.trajectories_per_step == 384  # same samples per step as SPEED's 16 x (4 + 20)
    dapo = get_recipe("dapo__qwen2.5-math-1.5b__deepscaler")()
    assert (dapo.curriculum.name, dapo.algorithm.clip_high, dapo.algorithm.advantage) == ("dapo", 0.28, "rloo")
    speed_dapo_js = get_recipe("speed_dapo_js__qwen2.5-math-7b__deepscaler")()
    assert (speed_dapo_js.curriculum.name, speed_dapo_js.algorithm.clip_high) == ("speed", 0.28)
    assert speed_dapo_js.algorithm.advantage == "js"


def test_eval_sets_follow_the_scripts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, "/prepared")
    cfg = get_recipe("speed_rloo_js__qwen2.5-math-1.5b__dapo17k")()
    assert cfg.eval.files == ("aime24", "aime25", "amc23", "math500", "dapo17k_heldout")
    assert cfg.eval.data_dir == "/prepared" and cfg.data.eval_files == ()
    assert (cfg.eval.every, cfg.eval.k, cfg.eval.temperature, cfg.eval.top_p) == (25, 4, 1.0, 1.0)
    # the k of the papers' metrics files (speed-rl 3a440be metrics_summary/1.5B-Math-*-dataDAPO-*)
    assert cfg.eval.set_k() == {"aime24": 16, "aime25": 16, "amc23": 4, "math500": 1, "dapo17k_heldout": 1}
    big = get_recipe("rloo__qwen2.5-math-7b__numinamath")().eval.set_k()
    assert (big["aime24"], big["aime25"], big["amc23"], big["math500"]) == (16, 16, 4, 1)
    numina = get_recipe("speed_rloo__qwen2.5-math-1.5b__numinamath")().eval.set_k()  # 1.5B-Math-*-RLOO-Numina-*
    assert (numina["aime24"], numina["amc23"]) == (4, 1)
    from megatron_speed.evaluate import resolve_files

    assert resolve_files(cfg.eval)[-1] == "/prepared/dapo17k_heldout.parquet"  # the preprocessor's file names


def test_jspo_math_recipe() -> None:
    cfg = get_recipe("jspo__qwen3-4b-base__dapo17k")()
    assert (cfg.rollout.n, cfg.curriculum.prompts_per_step, cfg.rollout.max_new_tokens) == (4, 1024, 6144)
    assert (cfg.algorithm.advantage, cfg.algorithm.clip_low, cfg.algorithm.clip_high) == ("js", 0.2, 0.28)
    assert cfg.optim.mini_batch_size == 128 * 4 and cfg.optim.lr == 1e-6
    assert (cfg.eval.files, cfg.eval.k, cfg.eval.temperature, cfg.eval.top_p) == (("aime24", "aime25"), 16, 0.6, 0.95)


def test_paths_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "prepared"))
    monkeypatch.setenv(MODEL_DIR_ENV, str(tmp_path / "hf"))
    cfg = get_recipe("speed_rloo__qwen2.5-math-1.5b__deepscaler")()
    assert cfg.data.train_files == (str(tmp_path / "prepared" / "deepscaler.parquet"),)
    assert cfg.model.hf_path == str(tmp_path / "hf" / "Qwen2.5-Math-1.5B")


def test_unknown_recipe_names_the_key() -> None:
    with pytest.raises(ConfigError, match="recipe"):
        get_recipe("speed_rloo__qwen2.5-math-3b__dapo17k")
