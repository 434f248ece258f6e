"""An endless, resumable stream of prompts: every record once per epoch, a fresh order each epoch.

The order of epoch `e` is a permutation drawn from a generator seeded by `(seed, e)` alone, so the
whole stream is a function of `(seed, number of records)` and the sampler's state is two integers,
the epoch and the position inside it. A run restored from `state_dict()` therefore continues with
exactly the prompts the interrupted run would have drawn. Deliberately left out: weighting and
filtering by difficulty, which the curriculum does on top of this stream.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from megatron_speed.records import PromptRecord


class PromptSampler:
    """Draws prompts `k` at a time, crossing epoch boundaries; `shuffle=False` keeps file order."""

    def __init__(self, records: Sequence[PromptRecord], *, seed: int, shuffle: bool = True) -> None:
        if not records:
            raise ValueError("PromptSampler needs at least one record: the dataset is empty "
                             "(check data.train_files and the reader's skip report)")
        self._records = records
        self._seed = int(seed)
        self._shuffle = bool(shuffle)
        self._epoch = 0
        self._position = 0
        self._order = self._epoch_order(0)

    @property
    def epoch(self) -> int:
        """The epoch the next prompt comes from (0-based), i.e. the number of completed passes."""
        return self._epoch

    def __len__(self) -> int:
        return len(self._records)

    def next(self, k: int) -> list[PromptRecord]:
        """The next `k` prompts of the stream (`k` may exceed the dataset: epochs roll over)."""
        if k < 0:
            raise ValueError(f"PromptSampler.next(k={k}): k must be >= 0")
        out: list[PromptRecord] = []
        while len(out) < k:
            take = min(k - len(out), len(self._order) - self._position)
            out.extend(self._records[i] for i in self._order[self._position:self._position + take])
            self._position += take
            if self._position == len(self._order):
                self._epoch += 1
                self._position = 0
                self._order = self._epoch_order(self._epoch)
        return out

    def state_dict(self) -> dict[str, int]:
        """Plain integers: where the stream stands, plus what it was built from (checked on load)."""
        return {"epoch": self._epoch, "position": self._position, "seed": self._seed,
                "num_records": len(self._records), "shuffle": int(self._shuffle)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from `state_dict()` of a sampler built on the same records, seed and shuffle."""
        built = {"seed": self._seed, "num_records": len(self._records), "shuffle": int(self._shuffle)}
        for key, mine in built.items():
            if int(state[key]) != mine:
                raise ValueError(f"sampler state has {key}={state[key]} but this sampler has {key}={mine}: "
                                 "resume with the same data files, data.shuffle and run.seed")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < len(self._records):
            raise ValueError(f"sampler state epoch={epoch}, position={position} is out of range for "
                             f"{len(self._records)} records")
        self._epoch, self._position = epoch, position
        self._order = self._epoch_order(epoch)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self._records)))
        if self._shuffle:
            # A string seed is hashed (sha512) by `random`, so distinct (seed, epoch) never collide.
            random.Random(f"prompt-sampler:{self._seed}:{epoch}").shuffle(order)
        return order
