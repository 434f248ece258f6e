"""Write LoRA adapters as a PEFT adapter folder: `adapter_config.json` + `adapter_model.safetensors`.

`peft.PeftModel.from_pretrained(base, folder)` loads it onto the base model (transformers), and
vLLM's LoRA path serves it (`LoRARequest(..., lora_path=folder)`). The folder is assembled under a
temporary name and renamed into place, and non-finite tensors are refused, as for the HF export.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_peft_folder(dst: Path, named_tensors: Iterable[tuple[str, torch.Tensor]], config: dict[str, Any]) -> Path:
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in named_tensors}
    bad = [name for name, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"refusing to write {dst}: non-finite values in {', '.join(bad[:5])}")
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)
    return dst
