"""Data: prompt files read into `PromptRecord`s, and the resumable sampler that streams them."""

from megatron_speed.data.dataset import DataError, SkipReport, read_many, read_prompts
from megatron_speed.data.sampler import PromptSampler
from megatron_speed.records import PromptRecord

__all__ = ["DataError", "PromptRecord", "PromptSampler", "SkipReport", "read_many", "read_prompts"]
