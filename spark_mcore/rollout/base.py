"""The rollout-engine protocol (engines are built by the registry in spark_mcore.rollout.builders).

An engine turns tokenized prompts into n sampled completions each, and accepts new policy
weights as HF-named full tensors. Every completion it returns was produced by the weights of
`policy_version`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from spark_mcore.types import Completion


@dataclass
class SamplingParams:
    """n samples per prompt; temperature 0 means greedy. Generation stops at any of
    `stop_token_ids` (the stop token is kept in the returned ids) or after max_new_tokens."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None


@runtime_checkable
class RolloutEngine(Protocol):
    policy_version: int

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """Returns, for each prompt, `params.n` completions in a stable order."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Loads HF-named full tensors and sets `policy_version = version`."""
        ...

    def shutdown(self) -> None:
        ...
