"""Build everything the loop needs from a validated `Config`: the one place runtime objects are made."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_speed.actor.actor import MegatronActor
from megatron_speed.checkpoint import save_hf_folder, save_peft_folder
from megatron_speed.checkpoint.resume import checkpoint_step, discard_checkpoints, keep_metrics_until, resolve_resume
from megatron_speed.config.base import require, to_dict
from megatron_speed.config.schema import Config
from megatron_speed.curriculum.base import Curriculum, build_curriculum
from megatron_speed.data import PromptSampler, read_many
from megatron_speed.data.templates import apply_template
from megatron_speed.evaluate import cap_per_set, resolve_files
from megatron_speed.memory.runtime import measured_engine_memory
from megatron_speed.metrics import MetricsLogger
from megatron_speed.metrics.targets import check_target_sets
from megatron_speed.parallel import ParallelDims, init_parallel
from megatron_speed.parallel.stop import StopOnSignal
from megatron_speed.preflight import check_paths
from megatron_speed.records import PromptRecord
from megatron_speed.rewards import RewardPool
from megatron_speed.rollout.engine import VLLMEngine
from megatron_speed.rollout.replicas import ReplicaLayout

log = logging.getLogger("megatron_speed")


@dataclass
class Components:
    cfg: Config
    dims: ParallelDims
    out_dir: Path
    hf_path: Path
    # Disaggregated placement: trainer ranks have no engine, grader pool or curriculum, and engine
    # ranks no actor (`dims.role`); colocated ranks hold all of them.
    engine: VLLMEngine | None
    actor: MegatronActor | None
    rewards: RewardPool | None
    curriculum: Curriculum | None
    logger: MetricsLogger
    eval_records: list[PromptRecord]
    pad_id: int
    data_metrics: dict[str, float]
    resume_from: Path | None = None  # the checkpoint this run continues (run.resume), None = fresh start
    stop: StopOnSignal | None = None  # SIGTERM -> checkpoint after this step and leave (parallel/stop.py)

    @property
    def replicas(self) -> ReplicaLayout:
        """This rank's engine replica: world / rollout.tensor_parallel_size replicas serve prompts."""
        return ReplicaLayout(self.dims.world_size, self.dims.rank, self.cfg.rollout.tensor_parallel_size)

    @property
    def device(self) -> torch.device:
        """Where the actor's tensors live: this rank's GPU, or the CPU."""
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def save_hf(self, tag: str) -> Path | None:
        """Export the policy in HF format under out_dir/hf/<tag> (rank 0 writes); with LoRA the weights
        are merged there, and the adapters alone go to out_dir/peft/<tag> as a PEFT adapter folder.

        The export is collective (every rank iterates it), but only the writing rank keeps the tensors,
        each copied to host memory as it arrives: no rank holds a second full model on its GPU."""
        writer = self.dims.is_main

        def kept(stream: Any) -> list[tuple[str, torch.Tensor]]:  # every rank iterates; the writer keeps
            return [(name, t.detach().to("cpu", copy=True)) for name, t in stream if writer]

        tensors = kept(self.actor.export_hf_weights())
        adapters = kept(self.actor.export_adapter_weights()) if self.cfg.model.lora.enabled else None
        if not writer:
            return None
        if adapters is not None:
            save_peft_folder(self.out_dir / "peft" / tag, adapters, self.actor.adapter_config())
        return save_hf_folder(self.out_dir / "hf" / tag, self.hf_path, tensors)

    def close(self) -> None:
        if self.stop is not None:
            self.stop.restore()
        if self.rewards is not None:
            self.rewards.close()
        if self.engine is not None:
            self.engine.close()
        self.logger.close()


def clear_previous_run(out_dir: Path) -> None:
    """A fresh run replaces the logs of an earlier run of the same name (HF exports are kept)."""
    stale = [out_dir / n for n in ("metrics.jsonl", "summary.json", "heldout_accuracy.png", "tensorboard", "ranks")]
    if any(p.exists() for p in stale):
        log.warning("%s holds an earlier run; its metrics, tensorboard logs and summary are replaced", out_dir)
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _on_main_first(dims: ParallelDims, fn: Any, name: str) -> Any:
    """Run `fn` on rank 0, then on the others (who find its cached result); `name` labels the barrier,
    which spans both sides of a disaggregated world."""
    if dims.is_main:
        result = fn()
    if dims.spanning is not None:
        dims.spanning.barrier(name)
    elif dims.world_size > 1:
        dist.barrier()
    return result if dims.is_main else fn()


def prepare_data(cfg: Config, out_dir: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Paths of the train and held-out prompt files.

    The toy task writes its generated splits (`toy_task.split_file`); explicit files replace the split
    of their kind: `data.train_files` the train split (the toy model and its warm start stay),
    `data.eval_files` the held-out split, unless they list the generated file too. The log says
    which. `eval.files` always add sets."""
    if cfg.data.toy is None:
        return cfg.data.train_files, cfg.data.eval_files
    from megatron_speed.data.toy_task import make_problems, split_file, write_jsonl

    splits = []
    for split, key, files in (("train", "data.train_files", cfg.data.train_files),
                              ("eval", "data.eval_files", cfg.data.eval_files)):
        toy_file = write_jsonl(make_problems(cfg.data.toy, split), split_file(out_dir, split))
        if files and toy_file.resolve() not in {Path(f).resolve() for f in files}:
            log.info("%s is set: it replaces the toy task's generated %s split, which is not used (to use "
                     "both, list it too: %s=[%s])", key, split, key, ",".join((*files, str(toy_file))))
        elif files:
            log.info("%s lists the toy task's generated %s split beside other files: all are used", key, split)
        splits.append(files or (str(toy_file),))
    return splits[0], splits[1]


def prepare_model(cfg: Config) -> Path:
    if cfg.model.hf_path != "toy":
        return Path(cfg.model.hf_path)
    from megatron_speed.toy.warmup import prepare_toy_model

    assert cfg.data.toy is not None  # guaranteed by Config.check
    return prepare_toy_model(cfg.model, cfg.data.toy, Path(cfg.run.output_dir) / "cache")


def read_split(paths: tuple[str, ...], cfg: Config, tokenizer: Any, *, max_prompt_tokens: int,
               name: str, counts: dict[str, float]) -> list[PromptRecord]:
    """Read one split, each prompt in `data.prompt_template` (its length checked as templated);
    skipped rows are logged and counted in `counts` (strict mode raises instead)."""
    template = cfg.data.prompt_template
    records, report = read_many(paths, count_tokens=lambda s: len(tokenizer.encode(apply_template(template, s))),
                                max_prompt_tokens=max_prompt_tokens, strict=cfg.data.strict)
    records = [dataclasses.replace(r, prompt=apply_template(template, r.prompt)) for r in records]
    log.info("%s prompts: %d kept; %s", name, len(records), report.summary())
    counts[f"data/{name}_prompts"] = float(len(records))
    counts[f"data/{name}_skipped"] = float(report.skipped)
    counts.update({f"data/{name}_skipped/{reason}": float(n) for reason, n in report.counts.items()})
    if not records:
        raise ValueError(f"no usable {name} prompts in {', '.join(paths)}: {report.summary()}")
    return records


def check_trimmed_rows(cfg: Config, dp: int) -> None:
    """Under `rollout.max_staleness` >= 1 a SPEED group may train without its screening samples (trimmed
    as too old, `BufferedCurriculum._within_lag`), so a batch's rows are a sum of `n_init + n_continue`
    and `n_continue` terms. Without sequence packing every batch must split evenly over the trainer's
    `dp` data-parallel ranks: say so at start-up rather than at the first trimmed batch."""
    cur = cfg.curriculum
    if cur.name != "speed" or not cfg.rollout.max_staleness or dp == 1 or cfg.optim.pack_sequences:
        return
    for key, value in (("n_init", cur.n_init), ("n_continue", cur.n_continue)):
        require(value % dp == 0, f"curriculum.{key}", value,
                f"must be a multiple of the trainer's data-parallel size ({dp}) with rollout.max_staleness="
                f"{cfg.rollout.max_staleness}: a group whose screening samples are too old trains on its "
                "continuation alone, and every batch must split evenly over the data-parallel ranks",
                f"use a multiple of {dp}, or set optim.pack_sequences=true (with optim.micro_batch_tokens)")


def build(cfg: Config) -> Components:
    check_paths(cfg)  # a missing model folder or prompt file stops here, before any process group
    disaggregated = cfg.rollout.placement == "disaggregated"
    dims = init_parallel(cfg.parallel, seed=cfg.run.seed, engine_ranks=cfg.rollout.num_ranks if disaggregated else 0)
    if dims.role == "trainer":
        check_trimmed_rows(cfg, dims.dp)
    out_dir = Path(cfg.run.output_dir) / cfg.run.name
    resume_from = resolve_resume(cfg.run.resume, out_dir)
    if dims.is_main and resume_from is None:
        clear_previous_run(out_dir)
        discard_checkpoints(out_dir)
    elif dims.is_main:  # a resumed run appends to its logs, minus what it will redo
        for log_file in ("metrics.jsonl", "trained.jsonl"):
            keep_metrics_until(out_dir / log_file, checkpoint_step(resume_from))
    out_dir.mkdir(parents=True, exist_ok=True)
    if dims.is_main:
        (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    hf_path = _on_main_first(dims, lambda: prepare_model(cfg), "model")
    train_files, eval_files = _on_main_first(dims, lambda: prepare_data(cfg, out_dir), "data")
    from transformers import AutoConfig, AutoTokenizer

    max_len = int(AutoConfig.from_pretrained(hf_path).max_position_embeddings)
    tokenizer = AutoTokenizer.from_pretrained(hf_path)
    limit = max_len - cfg.rollout.max_new_tokens
    counts: dict[str, float] = {}
    train = read_split(train_files, cfg, tokenizer, max_prompt_tokens=limit, name="train", counts=counts)
    held_out = read_split((*eval_files, *resolve_files(cfg.eval)), cfg, tokenizer, max_prompt_tokens=limit,
                          name="heldout", counts=counts)
    check_target_sets(cfg.eval.target_map(), {r.source for r in held_out})
    rollout_here, actor_here = dims.role != "trainer", dims.role != "engine"
    # The actor first: on a GPU the engine then takes its share of what the actor left free
    # (memory/runtime.py) instead of a fixed fraction of the device that the actor may not fit beside.
    actor = MegatronActor(hf_path, model_cfg=cfg.model, optim_cfg=cfg.optim, algorithm_cfg=cfg.algorithm,
                          temperature=cfg.rollout.temperature, horizon=cfg.rollout.max_new_tokens,
                          total_steps=cfg.schedule_steps, tp=dims.tp, pp=dims.pp,
                          first_stage_layers=cfg.parallel.num_layers_in_first_pipeline_stage,
                          last_stage_layers=cfg.parallel.num_layers_in_last_pipeline_stage) if actor_here else None
    memory = measured_engine_memory(cfg.rollout, actor.hf_config, actor.optimizer, max_model_len=max_len) \
        if actor is not None and rollout_here else None
    # The TP ranks of one engine replica must sample alike (same seed); replicas differ.
    replicas = ReplicaLayout(dims.world_size, dims.rank, cfg.rollout.tensor_parallel_size)
    lora = cfg.model.lora
    adapter_rank = lora.rank if lora.enabled and lora.refit == "adapter" else 0  # vLLM serves the adapter itself
    engine = VLLMEngine(hf_path, cfg.rollout, max_model_len=max_len, world_size=dims.world_size,
                        seed=cfg.rollout.seed + replicas.replica, rank=replicas.replica, memory=memory,
                        lora_rank=adapter_rank) if rollout_here else None
    sampler = PromptSampler(train, seed=cfg.run.seed, shuffle=cfg.data.shuffle)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lag = cfg.rollout.max_staleness if disaggregated else 0
    parts = Components(
        cfg=cfg, dims=dims, out_dir=out_dir, hf_path=hf_path, engine=engine, actor=actor,
        rewards=RewardPool(cfg.rewards.grader, cfg.rewards.num_workers, cfg.rewards.timeout_seconds)
        if rollout_here else None,
        curriculum=build_curriculum(cfg.curriculum, sampler, n=cfg.rollout.n, max_lag=lag) if rollout_here else None,
        # metrics.jsonl is rank 0's; the other ranks keep theirs under ranks/ (same numbers, for debugging)
        logger=MetricsLogger(out_dir if dims.is_main else out_dir / "ranks" / f"rank{dims.global_rank}",
                             tensorboard=cfg.metrics.tensorboard and dims.is_main,
                             progress_bar=cfg.metrics.progress_bar and dims.is_main,
                             total_steps=cfg.run.steps + 1,
                             purge_step=None if resume_from is None else checkpoint_step(resume_from) + 1),
        eval_records=cap_per_set(held_out, cfg.eval.max_prompts), pad_id=int(pad), data_metrics=counts,
        resume_from=resume_from)
    parts.stop = StopOnSignal(parts.device)  # last: nothing built after it replaces the SIGTERM handler
    return parts
