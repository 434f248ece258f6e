"""Write the policy as an HF folder (config, tokenizer, safetensors) without ever leaving half of one.

The folder is assembled under a temporary name next to the destination and renamed into place, so
a crash mid-write leaves the previous export intact. Tensors are checked to be finite first: a NaN
policy is never written.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja")


def save_hf_folder(dst: Path, src_hf_dir: Path, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Path:
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in named_tensors}
    bad = [name for name, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"refusing to write {dst}: non-finite values in {', '.join(bad[:5])}")
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in _COPIED:
        if (Path(src_hf_dir) / name).exists():
            shutil.copy2(Path(src_hf_dir) / name, tmp / name)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)
    return dst
