"""Where checkpoints live on disk and how one becomes visible: atomically, or not at all.

A checkpoint directory (written by the trainer or by `tools/convert_hf_to_megatron.py`) holds
```
  megatron/        megatron-core dist-checkpoint: model (+ optimizer + LR schedule from the trainer)
  hf/              the source HF config and tokenizer files, so the model can be rebuilt anywhere
  trainer/         rank_XXXXX.pt: the loop's state on each rank (trainer checkpoints only)
  meta.json        step, parallel layout it was written at, what it contains
  COMPLETE         written last: a directory without it is never loaded
```
A run's checkpoints sit in `<run dir>/checkpoints/`: each is assembled in `tmp-step_XXXXXX`, gets
its COMPLETE marker, is renamed to `step_XXXXXX`, and only then is the `latest` pointer replaced
(itself written to a temporary file and renamed). A crash at any point leaves the previous
checkpoint complete and `latest` pointing at it. Old complete checkpoints beyond `keep_last` are
deleted after the new one is in place; incomplete directories are reported and left alone.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
LATEST = "latest"
META = "meta.json"
_STEP = re.compile(r"^step_(\d{6,})$")

# HF files copied beside the weights: what AutoConfig, AutoTokenizer and vLLM read.
HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja")


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def copy_hf_files(src: Path, dst: Path) -> None:
    """Copy the config and tokenizer files of HF folder `src` (those that exist) into `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in HF_FILES:
        if (Path(src) / name).exists():
            shutil.copy2(Path(src) / name, dst / name)


def write_meta(path: Path, **fields: Any) -> None:
    (Path(path) / META).write_text(json.dumps({"format": "megatron-speed", **fields}, indent=2))


def read_meta(path: Path) -> dict[str, Any]:
    file = Path(path) / META
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a megatron-speed checkpoint: no {META} (expected a directory "
                                "written by the trainer or by tools/convert_hf_to_megatron.py)")
    return json.loads(file.read_text())


def mark_complete(path: Path) -> None:
    """The last file of a checkpoint; fsync'd so a crash right after cannot leave a marker without data."""
    with open(Path(path) / MARKER, "w") as f:
        f.write("ok\n")
        f.flush()
        os.fsync(f.fileno())


@dataclass(frozen=True)
class Scan:
    """What a checkpoints root holds: complete checkpoints by step, and what is not loadable."""

    complete: dict[int, Path]
    incomplete: list[Path]


def scan(root: Path) -> Scan:
    complete: dict[int, Path] = {}
    incomplete: list[Path] = []
    if Path(root).is_dir():
        for child in sorted(Path(root).iterdir()):
            m = _STEP.match(child.name)
            if m and child.is_dir() and is_complete(child):
                complete[int(m.group(1))] = child
            elif child.is_dir() and (m or child.name.startswith("tmp-step_")):
                incomplete.append(child)
    return Scan(complete, incomplete)


def latest_complete(root: Path) -> Path | None:
    """The checkpoint `latest` names if it is complete, else the newest complete one; None if none.

    Incomplete directories (an interrupted save, a copy without its marker) are logged and skipped."""
    found = scan(root)
    for path in found.incomplete:
        log.warning("ignoring incomplete checkpoint %s (no %s marker: its save was interrupted)", path, MARKER)
    pointer = Path(root) / LATEST
    if pointer.is_file():
        named = Path(root) / pointer.read_text().strip()
        if is_complete(named):
            return named
        log.warning("%s names %s, which is not a complete checkpoint; using the newest complete one",
                    pointer, named.name)
    return found.complete[max(found.complete)] if found.complete else None


def commit(tmp: Path, final: Path) -> None:
    """Mark `tmp` complete, rename it to `final`, then point `latest` at it (all atomic renames)."""
    mark_complete(tmp)
    if final.exists():  # a complete checkpoint of the same step from an earlier attempt: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = final.parent / (LATEST + ".tmp")
    pointer.write_text(final.name + "\n")
    os.replace(pointer, final.parent / LATEST)


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep_last`; incomplete ones are never touched
    here (one may be a save in progress). Returns what was deleted."""
    complete = scan(root).complete
    doomed = [complete[s] for s in sorted(complete)[:-keep_last]] if keep_last else []
    for path in doomed:
        shutil.rmtree(path)
    return doomed
