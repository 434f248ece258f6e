"""Typed records passed between the loop's stages.

Every stage hands the next one a record from this module, never a dict of lists: a prompt read from
disk (`PromptRecord`), one sampled response (`Completion`), all responses for one prompt in one
generation call (`RolloutGroup`), and the tensors the actor trains on (`TrainBatch`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, kw_only=True)
class PromptRecord:
    """One verifiable prompt. `uid` is unique within a dataset and stable across runs."""

    uid: str
    prompt: str
    answer: str
    source: str = ""


@dataclass(frozen=True, kw_only=True)
class SampleRequest:
    """Ask the engine for `n` responses to `prompt`; `phase` travels to the resulting group."""

    prompt: PromptRecord
    n: int
    phase: str = "train"


@dataclass(frozen=True, kw_only=True)
class Completion:
    """One sampled response: token ids, the engine's log-prob of each sampled token, and the policy
    version (actor steps) of the weights that sampled it: a group merged over generation calls
    (SPEED's screening + continuation) holds samples of more than one version."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    text: str
    finish_reason: str  # "stop" (end-of-sequence) or "length" (hit max_new_tokens)
    policy_version: int = 0


@dataclass(kw_only=True)
class RolloutGroup:
    """The responses to one prompt from one generation call, plus their rewards once scored.

    `phase` says why the prompt was sampled ("train", "screen", "continue", "eval"); the curriculum
    uses it instead of guessing from the group size. `policy_version` is the actor step whose
    weights generated the group (the oldest, when its samples span versions: see
    `Completion.policy_version`).
    """

    prompt: PromptRecord
    prompt_token_ids: tuple[int, ...]
    completions: list[Completion]
    phase: str = "train"
    policy_version: int = 0
    rewards: list[float] = field(default_factory=list)

    @property
    def pass_rate(self) -> float:
        return sum(r > 0 for r in self.rewards) / max(len(self.rewards), 1)

    @property
    def sample_versions(self) -> list[int]:
        """The policy version of each completion, in order."""
        return [c.policy_version for c in self.completions]


@dataclass(kw_only=True)
class TrainBatch:
    """Right-padded sequences (prompt + response) grouped by prompt, ready for the actor.

    Row i of every tensor is one trajectory; rows of prompt g are
    `group_offsets[g]:group_offsets[g+1]`. `response_mask[i, t]` is 1 where token t+1 of the
    sequence is a response token, i.e. the mask is aligned with next-token log-probs, so
    `logprobs[i, t] = log p(tokens[i, t+1] | tokens[i, :t+1])`.
    """

    tokens: torch.Tensor  # [N, S] int64
    response_mask: torch.Tensor  # [N, S-1] float32
    rollout_logprobs: torch.Tensor  # [N, S-1] float32, engine log-probs, 0 off the response
    rewards: torch.Tensor  # [N] float32
    group_offsets: torch.Tensor  # [G+1] int64
    uids: list[str]  # [G]
    versions: torch.Tensor | None = None  # [N] int64, the policy version that sampled each row

    def to(self, device: torch.device | str) -> TrainBatch:
        """The same batch with its tensors on `device` (the trainer moves it to the GPU when present)."""
        tensors = ("tokens", "response_mask", "rollout_logprobs", "rewards", "group_offsets")
        return TrainBatch(**{k: getattr(self, k).to(device) for k in tensors}, uids=list(self.uids),
                          versions=self.versions)

    def staleness(self, version: int) -> list[int]:
        """Per row: how many policy versions the sample is older than `version` (the weights it trains)."""
        return [] if self.versions is None else [version - int(v) for v in self.versions]

    @property
    def num_sequences(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum().item())
