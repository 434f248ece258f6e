"""Exact resume and crash-safe checkpoints.

The loop test runs the real toy loop (SPEED + James-Stein: the most stateful curriculum) 6 steps
straight, and 3 steps + pause + a fresh build that resumes + 3 steps, and asserts every logged
metric except timings is bitwise equal, as are the final weights. The pause falls where SPEED
carries accepted-but-not-continued prompts into the next call, so the carried buffer crosses the
boundary. The other tests write checkpoints of a tiny actor directly: an interrupted save, the
keep-last pruning, and the `run.resume` settings.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_speed.checkpoint import layout, resume
from megatron_speed.config.base import ConfigError
from megatron_speed.config.schema import AlgorithmConfig, Config, ModelConfig, OptimConfig, ParallelConfig
from megatron_speed.recipes import load_recipe
from megatron_speed.rollout.seeding import request_seed
from tests.tiny_models import tiny_hf_model

TIMINGS = ("time/", "throughput/")


def _toy(tmp: Path, name: str, *extra: str) -> Config:
    return load_recipe("toy_cpu_speed_js", [
        f"run.output_dir={tmp}", f"run.name={name}", "run.steps=6", "eval.every=0", "eval.max_prompts=8",
        "curriculum.prompts_per_step=4", "curriculum.n_init=4", "curriculum.n_continue=4",
        "curriculum.screen_prompts_per_call=8", "optim.mini_batch_size=16", "optim.micro_batch_size=8",
        "model.warmup.steps=300", "data.toy.eval_size=16", "metrics.progress_bar=false",
        "metrics.tensorboard=false", "metrics.plot=false", *extra])


def _train(cfg: Config, stop_after: int | None = None) -> Any:
    from megatron_speed.setup import build
    from megatron_speed.trainer import Trainer

    parts = build(cfg)
    try:
        return Trainer(parts).fit(stop_after)
    finally:
        parts.close()
        del parts
        gc.collect()  # the engine goes with its components: the resumed run builds everything afresh


def _metrics(run_dir: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not (k.startswith(TIMINGS) or "seconds" in k)} for row in rows]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_resumed_run_is_bitwise_the_uninterrupted_run(tmp_path: Path) -> None:
    straight = _train(_toy(tmp_path, "straight"))
    assert straight.steps == 6

    split_cfg = _toy(tmp_path, "split", "run.save_every=2", "run.keep_last=2")
    paused = _train(split_cfg, stop_after=3)
    assert paused.steps == 3
    ckpts = tmp_path / "split" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000002", "step_000003"]
    state = torch.load(ckpts / "step_000003" / "trainer" / "rank_00000.pt", weights_only=False)
    speed = state["curriculum"]
    carried = len(speed["ready"]) + len(speed["extra"]["screened"])  # surplus groups + pending continuations
    assert carried > 0, "the pause should fall where SPEED carries groups into the next step"
    print("carried across the pause:", len(speed["ready"]), "ready,", len(speed["extra"]["screened"]),
          "awaiting continuation")
    assert state["engine_calls"] > 3  # SPEED needs a screening call before its first continuation

    resumed = _train(split_cfg)
    assert resumed.steps == 6
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000004", "step_000006"]
    assert (ckpts / "latest").read_text().strip() == "step_000006"

    want, got = _metrics(tmp_path / "straight"), _metrics(tmp_path / "split")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 1, 2, 3, 4, 5, 6]
    for a, b in zip(want, got):
        assert a == b, {k: (a.get(k), b.get(k)) for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    assert resumed.final_accuracy == straight.final_accuracy
    assert resumed.accuracy_curve[-1][1] == straight.accuracy_curve[-1][1]
    assert resumed.eval_steps == straight.eval_steps  # time to target's RL steps survive the pause
    a, b = _weights(tmp_path / "straight" / "hf" / "final"), _weights(tmp_path / "split" / "hf" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- checkpoints of a tiny actor ------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_hf_model("qwen2", tmp_path_factory.mktemp("tiny") / "qwen2")


def _actor(hf_dir: Path, *, distributed_optimizer: bool = False) -> Any:
    from megatron_speed.actor.actor import MegatronActor
    from megatron_speed.parallel import init_parallel

    init_parallel(ParallelConfig(), seed=1)
    return MegatronActor(hf_dir, model_cfg=ModelConfig(), optim_cfg=OptimConfig(
        lr=1e-3, min_lr=1e-4, micro_batch_size=4, mini_batch_size=8,
        use_distributed_optimizer=distributed_optimizer), algorithm_cfg=AlgorithmConfig(),
        temperature=1.0, horizon=8, total_steps=10)


def _train_step(actor: Any, seed: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 64, (8, 12), generator=gen)
    mask = torch.ones(8, 11)
    return actor.train_step(tokens, mask, actor.compute_logprobs(tokens) - 0.01, torch.randn(8, 11, generator=gen))


def _save(root: Path, step: int, actor: Any, hf_dir: Path) -> Path:
    return resume.save_checkpoint(root, step, actor=actor, hf_src=hf_dir, trainer_state={"step": step},
                                  keep_last=2, layout={"world_size": 1, "tp": 1, "pp": 1})


def test_interrupted_save_keeps_previous_checkpoint_and_pruning_spares_incomplete(
        hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "checkpoints"
    actor = _actor(hf_dir)
    _train_step(actor, 0)
    _save(root, 1, actor, hf_dir)
    _train_step(actor, 1)
    _save(root, 2, actor, hf_dir)
    at_two = {n: p.detach().clone() for n, p in actor.module.named_parameters()}
    after_two = _train_step(actor, 2)  # what the run did right after checkpoint 2

    def crash(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt("killed while writing the trainer state")

    # The model and optimizer shards of step 3 are on disk when the process dies.
    monkeypatch.setattr(resume, "save_trainer_state", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(root, 3, actor, hf_dir)
    monkeypatch.undo()
    assert (root / "tmp-step_000003" / "megatron" / "metadata.json").is_file()
    assert (root / "latest").read_text().strip() == "step_000002"
    assert resume.resolve_resume("auto", tmp_path) == root / "step_000002"

    fresh = _actor(hf_dir)
    assert resume.load_checkpoint(root / "step_000002", actor=fresh, world_size=1) == {"step": 2}
    for name, param in fresh.module.named_parameters():
        assert torch.equal(param, at_two[name]), name
    assert _train_step(fresh, 2) == after_two  # optimizer moments and LR schedule came back too

    (root / "step_000000").mkdir()  # a copy that lost its marker: never loaded, never pruned
    _save(root, 3, fresh, hf_dir)  # replaces the debris of the interrupted attempt
    _save(root, 4, fresh, hf_dir)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000000", "step_000003", "step_000004"]
    assert layout.read_meta(root / "step_000004")["step"] == 4
    assert (root / "step_000004" / "hf" / "config.json").is_file()


def test_distributed_optimizer_state_round_trips(hf_dir: Path, tmp_path: Path) -> None:
    actor = _actor(hf_dir, distributed_optimizer=True)
    _train_step(actor, 0)
    _save(tmp_path, 1, actor, hf_dir)
    after = [_train_step(actor, s) for s in (1, 2)]
    fresh = _actor(hf_dir, distributed_optimizer=True)
    resume.load_checkpoint(tmp_path / "step_000001", actor=fresh, world_size=1)
    # Adam moments, step count and LR schedule all restored: the second step's statistics depend on the
    # first resumed update, which a wrong (or shared) Adam step count changes.
    assert [_train_step(fresh, s) for s in (1, 2)] == after


def test_resume_setting_and_marker(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert resume.resolve_resume("auto", run_dir) is None  # nothing saved yet: fresh start
    root = resume.checkpoints_root(run_dir)
    (root / "step_000005").mkdir(parents=True)
    layout.write_meta(root / "step_000005", step=5)
    assert resume.resolve_resume("auto", run_dir) is None  # no COMPLETE marker
    with pytest.raises(ConfigError, match=r"run\.resume .*step_000005.*not a complete checkpoint"):
        resume.resolve_resume(str(root / "step_000005"), run_dir)
    layout.mark_complete(root / "step_000005")
    assert resume.resolve_resume(str(root), run_dir) == root / "step_000005"
    assert resume.resolve_resume("", run_dir) is None
    resume.discard_checkpoints(run_dir)  # what a fresh start does: old steps must not outrank new ones
    assert not root.exists()
    with pytest.raises(ConfigError, match=r"run\.keep_last"):
        load_recipe("toy_cpu", ["run.keep_last=0"])


def test_metrics_after_the_checkpoint_are_dropped_on_resume(tmp_path: Path) -> None:
    file = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "x": s} for s in (0, 1, 2, 3, 3, 4)]
    file.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "x"')  # torn last line
    assert resume.keep_metrics_until(file, 3) == 2  # step 4 and the torn line
    assert [json.loads(line)["step"] for line in file.read_text().splitlines()] == [0, 1, 2, 3, 3]


def test_request_seeds_depend_on_every_part() -> None:
    base = request_seed(0, 0, 0, 0)
    assert request_seed(0, 0, 0, 0) == base < 2**62
    assert len({base, request_seed(1, 0, 0, 0), request_seed(0, 1, 0, 0), request_seed(0, 0, 1, 0),
                request_seed(0, 0, 0, 1)}) == 5
