"""Save a resumable checkpoint of a run and find / load the one to resume from.

`save_checkpoint` is collective: every rank writes its model and optimizer shards (megatron
dist-checkpointing) and its trainer state into `tmp-step_XXXXXX`; rank 0 then adds the HF config
and tokenizer, the metadata and the COMPLETE marker, renames the directory and moves `latest`
(see `layout.py`), and prunes to `run.keep_last`. `load_checkpoint` restores the actor (weights,
optimizer, LR schedule) and returns this rank's trainer state, RNG streams already restored.

`run.resume`: "auto" takes the latest complete checkpoint under `<run dir>/checkpoints` (a fresh
start when there is none), "" always starts fresh, anything else is a checkpoint directory or a
checkpoints root and must hold a complete checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_speed.checkpoint.layout import (
    commit,
    copy_hf_files,
    is_complete,
    latest_complete,
    prune,
    read_meta,
    step_name,
    write_meta,
)
from megatron_speed.checkpoint.megatron import load_megatron, save_megatron
from megatron_speed.checkpoint.trainer_state import load_trainer_state, save_trainer_state
from megatron_speed.config.base import ConfigError
from megatron_speed.parallel.stop import STOP_SIGNALS

log = logging.getLogger(__name__)


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def resolve_resume(setting: str, run_dir: Path) -> Path | None:
    """The checkpoint `run.resume` asks for, or None for a fresh start."""
    if setting == "":
        return None
    if setting == "auto":
        found = latest_complete(checkpoints_root(run_dir))
        if found is not None:
            log.info("resuming from %s (run.resume=auto)", found)
        return found
    path = Path(setting)
    if path.is_dir() and not (path / "meta.json").exists():
        found = latest_complete(path)  # a checkpoints root
        if found is not None:
            return found
    if not is_complete(path):
        raise ConfigError("run.resume", setting, "is not a complete checkpoint (no directory with a COMPLETE "
                          "marker there)", "point it at a step_XXXXXX directory or a checkpoints folder, use "
                          "\"auto\" for this run's latest, or \"\" to start fresh")
    return path


def discard_checkpoints(run_dir: Path) -> None:
    """A fresh start replaces an earlier run's checkpoints: left in place, its later steps would outrank
    the new run's in `latest_complete` and keep-last pruning."""
    root = checkpoints_root(run_dir)
    if root.is_dir() and any(root.iterdir()):
        log.warning("%s holds checkpoints of an earlier run and this run starts fresh (run.resume is \"\" or "
                    "found no complete checkpoint): deleting them", root)
        shutil.rmtree(root)


def save_checkpoint(root: Path, step: int, *, actor: Any, hf_src: Path, trainer_state: dict[str, Any],
                    keep_last: int, layout: dict[str, int]) -> Path:
    """Write checkpoint `step` under `root` (collective); returns its final path."""
    final, tmp = root / step_name(step), root / f"tmp-{step_name(step)}"
    main = _rank() == 0
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier interrupted save of this step
        (tmp / "megatron").mkdir(parents=True)
    _barrier()
    with stop_signals_deferred():
        save_megatron(tmp / "megatron", actor.chunks, actor.optimizer, actor.scheduler)
        save_trainer_state(tmp, _rank(), trainer_state)
        _barrier()  # every rank's files are on disk before rank 0 declares the checkpoint complete
        if main:
            copy_hf_files(hf_src, tmp / "hf")
            lora = actor.checkpoint_meta()  # with LoRA: adapters instead of the model, and the base model's path
            write_meta(tmp, step=step, contents=["adapters" if lora else "model", "optimizer", "scheduler", "trainer"],
                       **{**actor.layout, **layout, **lora})  # incl. the pipeline split
            commit(tmp, final)
            for path in prune(root, keep_last):
                log.info("deleted old checkpoint %s (run.keep_last=%d)", path, keep_last)
        _barrier()
    return final


@contextlib.contextmanager
def stop_signals_deferred() -> Iterator[None]:
    """Hold SIGTERM (preemption) back until the save is over.

    SLURM and torchrun signal every process of the job, and dist-checkpointing writes through helper
    processes (a multiprocessing manager, forked writers): killed mid-save, they fail the save. Started
    while the signal is blocked in this (main) thread, they inherit the blocked mask and finish. This
    process still sees the signal (now, through another thread, or when the block lifts): its handler
    only sets the stop flag (parallel/stop.py)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def load_checkpoint(path: Path, *, actor: Any, world_size: int) -> dict[str, Any]:
    """Restore the actor from `path` and return this rank's trainer state (RNG streams restored)."""
    meta = read_meta(path)
    if meta.get("world_size", world_size) != world_size:
        raise ValueError(f"{path} was written by {meta['world_size']} processes but this run has {world_size}: "
                         "the trainer state is per rank; resume with the same number of processes (or convert "
                         "the model with tools/convert_megatron_to_hf.py and start a new run from it)")
    check_lora_meta(path, meta, actor.checkpoint_meta())
    load_megatron(Path(path) / "megatron", actor.chunks, actor.optimizer, actor.scheduler)
    return load_trainer_state(path, _rank())


def check_lora_meta(path: Path, meta: dict[str, Any], mine: dict[str, Any]) -> None:
    """A LoRA checkpoint resumes only as the same LoRA on the same base model (its base weights are
    not in it), and a full checkpoint only without LoRA."""
    if meta.get("lora") != mine.get("lora"):
        raise ConfigError("model.lora", mine.get("lora"), f"differs from the checkpoint's {meta.get('lora')} "
                          f"({path})", "resume with the checkpoint's model.lora settings, or start fresh with "
                          "run.resume=\"\"")
    if mine and meta.get("base_model") != mine["base_model"]:
        raise ConfigError("model.hf_path", mine["base_model"], f"is not the base model of the LoRA checkpoint "
                          f"{path} ({meta.get('base_model')}), which holds adapters only",
                          f"set model.hf_path={meta.get('base_model')}")


def keep_metrics_until(metrics_file: Path, step: int) -> int:
    """Drop the JSON lines logged after `step` (they belong to steps the resumed run will redo);
    the file is rewritten atomically. Returns how many lines were dropped."""
    if not metrics_file.is_file():
        return 0
    lines = metrics_file.read_text().splitlines(keepends=True)
    kept = [line if line.endswith("\n") else line + "\n" for line in lines if _step_of(line) <= step]
    tmp = metrics_file.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, metrics_file)
    return len(lines) - len(kept)


def _step_of(line: str) -> float:
    """The step of one metrics line; a torn last line (crash mid-write) counts as after every step."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


def checkpoint_step(path: Path) -> int:
    return int(read_meta(path)["step"])
