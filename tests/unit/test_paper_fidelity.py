"""What a paper recipe must reproduce of upstream: updates per RL step, the LR schedule counted in RL
steps, the grader, the evaluation's k per set, the DAPO baseline's discarded surplus, JSPO's settings
and its `qwen-math` prompt template.

The expected numbers are upstream's, derived here from upstream's own knobs (verl multiplies
`ppo_mini_batch_size`, counted in prompts, by `rollout.n`, which for SPEED is n_init) rather than
read back from our recipes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_speed.recipes import load_recipe
from megatron_speed.recipes.papers import PAPER_RECIPES

# (prompts per RL step, samples per trained prompt, verl ppo_mini_batch_size in prompts, verl rollout.n)
SPEED_SCRIPTS = (16, 24, 16, 4)  # run_fast_rloo_7b.sh: N_init 4 + N_cont 20
BASELINE_SCRIPTS = (16, 24, 16, 24)  # run_rloo_7b.sh: n 24
JSPO_SCRIPT = (1024, 4, 128, 4)  # code/run_math.sh


def verl_updates(prompts: int, per_prompt: int, mini_prompts: int, rollout_n: int) -> int:
    return (prompts * per_prompt) // (mini_prompts * rollout_n)


@pytest.mark.parametrize("name", sorted(PAPER_RECIPES))
def test_updates_per_rl_step_match_upstream(name: str) -> None:
    cfg = PAPER_RECIPES[name]()
    if name.startswith("jspo"):
        expected = verl_updates(*JSPO_SCRIPT)
        assert expected == 8
    elif name.startswith("speed_"):
        expected = verl_updates(*SPEED_SCRIPTS)
        assert expected == 6
    else:
        expected = verl_updates(*BASELINE_SCRIPTS)
        assert expected == 1
    assert cfg.updates_per_step == expected
    assert cfg.optim.lr_schedule_unit == "rl_step"  # verl's scheduler steps once per RL step
    assert cfg.schedule_steps == cfg.run.steps


def test_controlled_variant_is_one_override_away() -> None:
    cfg = load_recipe("speed_rloo__qwen2.5-math-7b__dapo17k", ["optim.mini_batch_size=384"])
    assert cfg.updates_per_step == 1


@pytest.mark.parametrize("name", sorted(PAPER_RECIPES))
def test_paper_recipes_grade_and_evaluate_as_upstream(name: str) -> None:
    cfg = PAPER_RECIPES[name]()
    assert cfg.rewards.grader == "math_verify_response"
    assert not cfg.eval.greedy  # the papers sample only
    k = cfg.eval.set_k()
    if name.startswith("jspo"):
        assert cfg.eval.files == ("aime24", "aime25") and cfg.eval.k == 16 and cfg.eval.every == 10
        assert (cfg.eval.temperature, cfg.eval.top_p) == (0.6, 0.95)
        return
    assert "amc23" in cfg.eval.files and cfg.eval.every == 25
    numina_rloo_15b = "1.5b__numinamath" in name and "dapo" not in name.split("__")[0]
    assert (k["aime24"], k["aime25"], k["amc23"]) == ((4, 4, 1) if numina_rloo_15b else (16, 16, 4))
    assert k["math500"] == 1 and k["dapo17k_heldout"] == 1


@pytest.mark.parametrize("name", sorted(PAPER_RECIPES))
def test_dapo_baselines_discard_their_surplus(name: str) -> None:
    cfg = PAPER_RECIPES[name]()
    if cfg.curriculum.name == "dapo":
        assert cfg.curriculum.dapo_surplus == "discard"


def test_jspo_recipe_settings() -> None:
    cfg = PAPER_RECIPES["jspo__qwen3-4b-base__dapo17k"]()
    assert cfg.algorithm.clip_c == 3.0 and cfg.optim.weight_decay == 0.01
    assert (cfg.algorithm.clip_low, cfg.algorithm.clip_high) == (0.2, 0.28)
    assert cfg.data.prompt_template == "qwen-math" and cfg.optim.lr_warmup_steps == 0


def test_qwen_math_template_matches_jspo_jinja() -> None:
    """Our rendering equals JSPO-Official's jinja template (rl_dataset.py, `chat_template_dict`) rendered
    by transformers' own chat-template renderer for one user message, as verl's dataset does."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from megatron_speed.data.templates import apply_template

    # Python source upstream: a triple-quoted string whose "assistant\n" escape is a real newline.
    upstream = ("<|im_start|>system\nPlease reason step by step and put the final answer in \\boxed{}. <|im_end|>\n"
                "<|im_start|>user\n{% for message in messages %}{{ message['content'] }}{% endfor %} <|im_end|>\n"
                "<|im_start|>assistant\n\n")
    question = "What is $1+1$? Put it in \\boxed{}."
    rendered = render_jinja_template([[{"role": "user", "content": question}]], chat_template=upstream,
                                     add_generation_prompt=True)
    rendered = rendered[0][0] if isinstance(rendered, tuple) else rendered
    rendered = rendered[0] if isinstance(rendered, list) else rendered
    assert apply_template("qwen-math", question) == rendered
    assert apply_template("", question) == question


def test_unknown_template_is_a_config_error() -> None:
    from megatron_speed.config.base import ConfigError

    with pytest.raises(ConfigError, match=r"data\.prompt_template"):
        load_recipe("toy_cpu", ["data.prompt_template=chatml-typo"])


def test_greedy_off_needs_samples() -> None:
    from megatron_speed.config.base import ConfigError

    with pytest.raises(ConfigError, match=r"eval\.greedy"):
        load_recipe("toy_cpu", ["eval.greedy=false"])


# --------------------------------------------------------------------- the LR schedule, on the toy model


def _verl_constant_with_warmup(lr: float, warmup: int, step: int) -> float:
    """verl's `get_constant_schedule_with_warmup` (torch_functional.py) at RL step `step` (0-based)."""
    return lr * min(1.0, step / max(1, warmup))


@pytest.mark.parametrize("unit", ["rl_step", "optimizer_step"])
def test_lr_of_the_first_12_rl_steps_follows_verl(tmp_path: Path, unit: str) -> None:
    """A SPEED-shaped step (96 trajectories, mini-batches of 16: 6 updates) on the toy model, 10
    warm-up RL steps: with the schedule counted in RL steps every update of RL step k runs at verl's
    lr * min(1, k/10); counted in optimizer updates (megatron's unit) it does not."""
    from megatron_speed.actor.actor import MegatronActor
    from megatron_speed.config.schema import AlgorithmConfig, ModelConfig, OptimConfig, ParallelConfig
    from megatron_speed.parallel import init_parallel
    from tests.unit.test_actor import _tiny_qwen2

    hf_dir = _tiny_qwen2(tmp_path / "tiny")
    init_parallel(ParallelConfig(), seed=1)
    lr, warmup = 1e-4, 10
    optim = OptimConfig(lr=lr, min_lr=lr, lr_warmup_steps=warmup, lr_schedule_unit=unit, mini_batch_size=16,
                        micro_batch_size=16)
    actor = MegatronActor(hf_dir, model_cfg=ModelConfig(), optim_cfg=optim, algorithm_cfg=AlgorithmConfig(),
                          temperature=1.0, horizon=8, total_steps=12 if unit == "rl_step" else 72)
    seen: list[list[float]] = []
    original = actor._optimizer_step

    def recording(mbs):  # the LR each optimizer update actually runs at
        seen[-1].append(actor.optimizer.param_groups[0]["lr"])
        return original(mbs)

    actor._optimizer_step = recording
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 32, (96, 10), generator=gen)
    mask = torch.ones(96, 9)
    for _ in range(12):
        seen.append([])
        adv = torch.randn(96, 1, generator=gen) * mask
        actor.train_step(tokens, mask, actor.compute_logprobs(tokens), adv)
    assert all(len(updates) == 6 for updates in seen)
    expected = [_verl_constant_with_warmup(lr, warmup, k) for k in range(12)]
    if unit == "rl_step":
        for k, updates in enumerate(seen):
            assert updates == pytest.approx([expected[k]] * 6, abs=1e-12), k
    else:  # megatron's unit warms up over 10 optimizer updates: already at full LR in RL step 2
        assert seen[1][-1] != pytest.approx(expected[1]) and seen[2][0] == pytest.approx(lr)


@pytest.mark.slow
def test_speed_recipe_lr_follows_verl_through_the_trainer(tmp_path: Path) -> None:
    """`toy_cpu_speed_rloo` in upstream mode (mini-batch = prompts x n_init as verl counts it, schedule in
    RL steps; examples/reproduce_toy.arm_overrides) with 10 warm-up RL steps, run for 12 RL steps by the
    real loop (`main.run`): the `train/lr` each step logs in metrics.jsonl is verl's lr * min(1, k/10)
    for RL step k = 0..11, while the actor made 6 optimizer updates in every one of those steps."""
    import json

    from megatron_speed.main import run
    from megatron_speed.recipes.papers import upstream_mini_batch

    prompts, n_init, n_continue = 4, 4, 20  # the paper's 4 + 20 samples per trained prompt
    mini = upstream_mini_batch(prompts, n_init)
    cfg = load_recipe("toy_cpu_speed_rloo", [
        f"run.output_dir={tmp_path}", "run.steps=12", "eval.every=0", "eval.max_prompts=4",
        "metrics.progress_bar=false", "metrics.tensorboard=false", "metrics.plot=false",
        f"curriculum.prompts_per_step={prompts}", f"curriculum.n_init={n_init}", f"curriculum.n_continue={n_continue}",
        "curriculum.screen_prompts_per_call=16", f"optim.mini_batch_size={mini}", f"optim.micro_batch_size={mini}",
        "optim.lr_schedule_unit=rl_step", "optim.lr_warmup_steps=10",
        "data.toy.max_digits=2", "data.toy.train_size=400", "data.toy.eval_size=8", "model.warmup.steps=60"])
    assert cfg.updates_per_step == prompts * (n_init + n_continue) // mini == 6
    assert run(cfg).steps == 12
    rows = [json.loads(line) for line in (tmp_path / "toy_cpu_speed_rloo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] >= 1 and "train/lr" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert all(r["train/optimizer_updates"] == 6 for r in steps)
    expected = [_verl_constant_with_warmup(cfg.optim.lr, 10, k) for k in range(12)]
    assert [r["train/lr"] for r in steps] == pytest.approx(expected, abs=1e-12)
