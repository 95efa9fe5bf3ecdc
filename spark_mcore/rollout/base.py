"""The rollout-engine protocol (engines are built from a RunConfig in spark_mcore.engines).

An engine turns tokenized prompts into n sampled completions each. Every completion it
returns was produced by the weights of `policy_version`. How new weights reach an engine is
the weight pusher's business (spark_mcore.engines): in-process engines take HF-named full
tensors (`update_weights`), SGLang servers take the bucketed sync of spark_mcore.weights.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from spark_mcore.types import Completion, SamplingParams


@runtime_checkable
class RolloutEngine(Protocol):
    policy_version: int

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """Returns, for each prompt, `params.n` completions in a stable order."""
        ...

    def shutdown(self) -> None:
        ...


__all__ = ["RolloutEngine", "SamplingParams"]
