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
    `stop_token_ids` (the stop token is kept in the returned ids) or after max_new_tokens.

    Seeds: `sample_seeds[i][j]` is the seed of sample j of prompt i (see
    `spark_mcore.rollout.groups.response_seeds`: a function of the step seed, the prompt id and
    the sample index, so a response does not depend on which rank or batch generates it).
    Without it, `seed` gives sample (i, j) the seed `seed + i * n + j`; with neither, sampling
    is unseeded."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    sample_seeds: list[list[int]] | None = None

    def seeds_for(self, num_prompts: int) -> list[list[int]] | None:
        """Per-sample seeds [num_prompts][n] (None: unseeded); validates `sample_seeds`."""
        if self.sample_seeds is not None:
            if len(self.sample_seeds) != num_prompts or any(len(s) != self.n for s in self.sample_seeds):
                raise ValueError(f"params.sample_seeds: expected {num_prompts} lists of n={self.n} seeds, got "
                                 f"{[len(s) for s in self.sample_seeds]}")
            return [list(s) for s in self.sample_seeds]
        if self.seed is None:
            return None
        return [[self.seed + i * self.n + j for j in range(self.n)] for i in range(num_prompts)]


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
