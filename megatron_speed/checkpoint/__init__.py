"""Checkpoints. Here: HF-format exports of the policy, written atomically.

Megatron dist-checkpointing of model + optimizer + trainer state (exact resume) arrives with the
resume work; an HF export is what `transformers`, vLLM and the evaluation tools load.
"""

from megatron_speed.checkpoint.hf import save_hf_folder
from megatron_speed.checkpoint.peft import save_peft_folder

__all__ = ["save_hf_folder", "save_peft_folder"]
