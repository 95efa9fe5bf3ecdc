from __future__ import annotations

from dataclasses import dataclass

from spark_mcore.config.loader import ConfigError, check_ranges


@dataclass
class RolloutConfig:
    """Response generation.

    engine: registry name of the rollout engine ("hf" = transformers on this process).
    n: responses per prompt (the GRPO group size).
    temperature / top_p: sampling for training rollouts (evaluation is greedy).
    max_new_tokens: generation budget per response.
    batch_size: sequences per generate() call (memory bound of the hf engine).
    """

    engine: str = "hf"
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 256

    def __post_init__(self) -> None:
        check_ranges("rollout", self, {"max_new_tokens": ">= 1", "batch_size": ">= 1"})
        if self.n < 1:
            raise ConfigError("rollout.n must be >= 1 (use >= 2 for GRPO advantages)")
        if self.temperature < 0:
            raise ConfigError("rollout.temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError("rollout.top_p must be in (0, 1]")
