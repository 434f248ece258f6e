"""The loop's own state beside the weights: one small file per rank, and the RNG streams.

What goes in is decided by the trainer (`Trainer.state_dict()`: step, curriculum with its sampler
and carried buffers, engine call counter, metric history, accuracy curve, clocks); this module
adds the random number generators every rank draws from (python, numpy, torch CPU, torch CUDA,
megatron's model-parallel RNG tracker) and reads/writes the file. The file is a pickle written by
`torch.save` (it holds tensors and plain containers) and is only ever read back by this code.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("tracker"):
        get_cuda_rng_tracker().set_states(state["tracker"])


def rank_file(checkpoint: Path, rank: int) -> Path:
    return Path(checkpoint) / "trainer" / f"rank_{rank:05d}.pt"


def save_trainer_state(checkpoint: Path, rank: int, state: dict[str, Any]) -> None:
    path = rank_file(checkpoint, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**state, "rng": rng_state()}, path)


def load_trainer_state(checkpoint: Path, rank: int) -> dict[str, Any]:
    """This rank's saved state; the RNG streams are restored as a side effect."""
    path = rank_file(checkpoint, rank)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint was written by fewer ranks than this run "
                                "has; resume with the same number of processes")
    state = torch.load(path, weights_only=False)
    set_rng_state(state.pop("rng"))
    return state
