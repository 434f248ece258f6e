"""HF folder <-> megatron dist-checkpoint, at any TP/PP layout (what the tools/ converters run).

`hf_to_megatron` builds this rank's GPTModel shard from the HF config, fills it through the
bridge (`bridge/weights.py`) and saves it with dist-checkpointing, plus the HF config and
tokenizer files so the reverse direction can rebuild the model without the source folder.
`megatron_to_hf` rebuilds the model at the layout of the current process group, loads the
checkpoint (dist-checkpointing reshards: a TP=2 checkpoint loads at TP=1), gathers full HF-named
tensors and lets rank 0 write an HF folder. Trainer checkpoints have the same layout, so their
model part converts too (the optimizer and trainer state are simply not read).

Both are collective: every rank of a `tensor_parallel_size x pipeline_parallel_size` world calls
them (the CLI initialises that world). Pipeline stages may be uneven (megatron-core's
`num_layers_in_first/last_pipeline_stage`): dist-checkpointing keys every layer by its global index,
so a checkpoint written with one split loads with another, or with none. meta.json records the
split it was written with (`layers_per_stage`). MoE models may also split their experts over `ep`
ranks (the dense layers are then copied on each; dist-checkpointing stores one copy, and stores
experts by global index, so any EP layout loads any other). Deliberately left out: other
data-parallel replicas (a converter needs one copy of the model), vocabulary padding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_speed.checkpoint.hf import save_hf_folder
from megatron_speed.checkpoint.layout import (
    copy_hf_files,
    is_complete,
    latest_complete,
    mark_complete,
    read_meta,
    write_meta,
)
from megatron_speed.checkpoint.megatron import load_megatron, save_megatron
from megatron_speed.config.base import ConfigError
from megatron_speed.parallel.cpu_support import cpu_megatron

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# The converter CLIs' flags for the config keys a layout error names.
_FLAGS = {"parallel.pipeline_parallel_size": "--pp",
          "parallel.num_layers_in_first_pipeline_stage": "--first-stage-layers",
          "parallel.num_layers_in_last_pipeline_stage": "--last-stage-layers"}


def _in_flags(text: str) -> str:
    for key, flag in _FLAGS.items():
        text = text.replace(key, flag)
    return text


def check_layout(hf_config: Any, tp: int, pp: int, first: int | None = None,
                 last: int | None = None, ep: int = 1) -> tuple[int, ...]:
    """Refuse, with the numbers, a layout megatron would fail on deep inside model construction;
    returns the layers on each pipeline stage (`first` / `last`: megatron's uneven end stages)."""
    from megatron_speed.actor.model import architecture
    from megatron_speed.actor.moe import check_expert_parallel
    from megatron_speed.config.schema import ParallelConfig

    architecture(hf_config)  # ValueError naming the model_type / unsupported feature
    try:
        check_expert_parallel(hf_config, ep=ep, etp=tp, tp=tp)
    except ConfigError as err:
        raise ValueError(f"--ep {ep}: {err.rule}; {err.fix}") from None
    sizes = {"num_attention_heads": hf_config.num_attention_heads,
             "num_key_value_heads": getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
             "vocab_size": hf_config.vocab_size, "intermediate_size": hf_config.intermediate_size}
    bad = [f"{k}={v}" for k, v in sizes.items() if v % tp]
    if bad:
        raise ValueError(f"--tp {tp} does not divide the model's {', '.join(bad)}: pick a --tp that divides them")
    try:
        return ParallelConfig(pipeline_parallel_size=pp, num_layers_in_first_pipeline_stage=first,
                              num_layers_in_last_pipeline_stage=last).layers_per_stage(hf_config.num_hidden_layers)
    except ConfigError as err:
        raise ValueError(_in_flags(str(err))) from None


def layout_meta(tp: int, pp: int, first: int | None, last: int | None, layers: tuple[int, ...]) -> dict[str, Any]:
    """What meta.json records of a checkpoint's model-parallel layout (the trainer's actor writes the same)."""
    return {"tp": tp, "pp": pp, "vpp": 1, "layers_per_stage": list(layers),
            "num_layers_in_first_pipeline_stage": first, "num_layers_in_last_pipeline_stage": last}


def _dtype(hf_config: Any) -> torch.dtype:
    """Keep the source precision (bit-exact round trip); anything but bf16 is held in float32."""
    name = str(getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or "float32")
    return DTYPES.get(name.removeprefix("torch."), torch.float32)


def _build(hf_config: Any, tp: int, pp: int, first: int | None, last: int | None,
           ep: int = 1) -> tuple[Any, Any, tuple[int, ...]]:
    from megatron_speed.actor.model import build_gpt_model
    from megatron_speed.bridge import mapping_for

    layers = check_layout(hf_config, tp, pp, first, last, ep)
    mapping = mapping_for(hf_config)
    with cpu_megatron():
        model = build_gpt_model(hf_config, params_dtype=_dtype(hf_config), tp=tp, pp=pp,
                                first_stage_layers=first, last_stage_layers=last)
    return model, mapping, layers


def hf_to_megatron(hf_dir: Path, out: Path, *, tp: int, pp: int, first_stage_layers: int | None = None,
                   last_stage_layers: int | None = None, ep: int = 1) -> Path:
    """Write `hf_dir` as a model-only megatron checkpoint at layout (tp, pp, ep) into `out` (collective).
    `first_stage_layers` / `last_stage_layers`: uneven end stages (None = the even split)."""
    from transformers import AutoConfig

    from megatron_speed.bridge.weights import load_hf_weights

    hf_dir, out = Path(hf_dir), Path(out)
    if _rank() == 0 and out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: choose a new --out directory")
    model, mapping, layers = _build(AutoConfig.from_pretrained(hf_dir), tp, pp, first_stage_layers, last_stage_layers,
                                    ep)
    load_hf_weights(model, mapping, hf_dir)
    if _rank() == 0:
        (out / "megatron").mkdir(parents=True)
    _barrier()
    save_megatron(out / "megatron", model)
    if _rank() == 0:
        copy_hf_files(hf_dir, out / "hf")
        write_meta(out, step=0, contents=["model"], world_size=tp * pp * ep, source=str(hf_dir), ep=ep,
                   **layout_meta(tp, pp, first_stage_layers, last_stage_layers, layers))
        mark_complete(out)
    _barrier()
    return out


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory itself, or the latest complete one under a checkpoints root or run dir."""
    path = Path(path)
    if (path / "meta.json").is_file():
        if not is_complete(path):
            raise ValueError(f"{path} has no COMPLETE marker: its save was interrupted; use an earlier checkpoint")
        return path
    for root in (path, path / "checkpoints"):
        found = latest_complete(root)
        if found is not None:
            return found
    raise FileNotFoundError(f"no complete megatron-speed checkpoint in {path} (expected meta.json + COMPLETE, "
                            "or a checkpoints folder holding step_XXXXXX directories)")


def megatron_to_hf(ckpt: Path, out: Path, *, tp: int = 1, pp: int = 1, first_stage_layers: int | None = None,
                   last_stage_layers: int | None = None, ep: int = 1, peft_out: Path | None = None) -> Path:
    """Load checkpoint `ckpt` at layout (tp, pp[, uneven end stages], ep) and write an HF folder to `out`
    (collective; rank 0 writes). Any layout loads any checkpoint: layers and experts are keyed by global index.
    A LoRA checkpoint is merged onto its base model; `peft_out` also gets its adapters as a PEFT folder."""
    from transformers import AutoConfig

    from megatron_speed.bridge.lora import export_adapter_weights, peft_adapter_config
    from megatron_speed.bridge.weights import export_hf_weights
    from megatron_speed.checkpoint.peft import save_peft_folder

    ckpt = resolve_checkpoint(ckpt)
    meta = read_meta(ckpt)
    hf_files = ckpt / "hf"
    hf_config = AutoConfig.from_pretrained(hf_files)
    model, mapping, _ = _build(hf_config, tp, pp, first_stage_layers, last_stage_layers, ep)
    lora = _attach_lora(model, mapping, meta, hf_config)
    load_megatron(ckpt / "megatron", model)
    tensors = list(export_hf_weights(model, mapping))  # every rank iterates: TP gathers, PP broadcasts
    adapters = list(export_adapter_weights(model)) if lora is not None else []
    if _rank() == 0:
        save_hf_folder(Path(out), hf_files, tensors)
        if lora is not None and peft_out is not None:
            save_peft_folder(Path(peft_out), adapters, peft_adapter_config(
                base_model=meta["base_model"], rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                targets=lora.targets))
    _barrier()
    return Path(out)


def _attach_lora(model: Any, mapping: Any, meta: dict[str, Any], hf_config: Any) -> Any:
    """A LoRA checkpoint holds adapters only: load its base model's weights, then attach the adapters
    (which `load_megatron` fills). Returns the LoraConfig, or None for a full checkpoint."""
    if "lora" not in meta:
        return None
    from megatron_speed.actor.lora import apply_lora
    from megatron_speed.bridge.weights import load_hf_weights
    from megatron_speed.config.schema import LoraConfig

    base = Path(meta["base_model"])
    if not base.is_dir():
        raise FileNotFoundError(f"the LoRA checkpoint's base model {base} is gone: its base weights are not in the "
                                "checkpoint, so restore that HF folder (meta.json: base_model) to convert it")
    saved = meta["lora"]
    lora = LoraConfig(rank=saved["rank"], alpha=saved["alpha"], dropout=saved.get("dropout", 0.0),
                      targets=tuple(saved["targets"]))  # dropout: absent in checkpoints written before it was recorded
    load_hf_weights(model, mapping, base)
    with cpu_megatron():
        apply_lora(model, lora, hf_config, dtype=_dtype(hf_config))
    return lora
