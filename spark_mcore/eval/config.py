from __future__ import annotations

from dataclasses import dataclass

from spark_mcore.config.loader import ConfigError, check_ranges


@dataclass
class EvalConfig:
    """Held-out evaluation: greedy accuracy, plus sampled accuracy when `samples` > 0.

    max_new_tokens: generation budget per answer.
    limit: evaluate at most this many prompts (0 = all).
    samples: also draw this many responses per prompt at `temperature` and report their mean
        accuracy (avg@k, what the RL objective optimises); 0 = greedy only.
    temperature: sampling temperature for `samples` (use the rollout temperature).
    seed: sampling seed, so that two evaluations of the same weights agree.
    Generation batches are the engine's (rollout.batch_size for the transformers engine).
    """

    max_new_tokens: int = 64
    limit: int = 0
    samples: int = 0
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_ranges("eval", self, {"max_new_tokens": ">= 1", "temperature": ">= 0"})
        if self.samples < 0 or self.max_new_tokens < 1 or self.limit < 0:
            raise ConfigError("eval.samples and eval.limit must be >= 0, eval.max_new_tokens >= 1")
        if self.samples and self.temperature <= 0:
            raise ConfigError(f"eval.temperature must be > 0 when eval.samples > 0, got {self.temperature}")
