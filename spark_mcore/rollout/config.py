from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from spark_mcore.config.loader import ConfigError


@dataclass
class RolloutConfig:
    """Response generation.

    engine: registry name of the rollout engine ("hf" = transformers on this process).
    n: responses per prompt (the GRPO group size).
    temperature / top_p: sampling for training rollouts (evaluation is greedy).
    max_new_tokens: generation budget per response.
    batch_size: sequences per generate() call (memory bound of the hf engine).
    source: where a step's groups come from: "inprocess" (engine, verifiers and SPARK recycler
        in the trainer processes) or "stream" (`spark-mcore rollout-worker` processes over the
        ZeroMQ endpoint of the `transport:` section).
    mode: "sync" (assign step k's prompts, wait, train, push weights) or "async" (workers
        generate the next step's prompts while the trainer trains; stream only).
    max_staleness: async mode: the oldest policy version (current - max_staleness) whose
        groups are still trained on (older ones are generated again); >= 1.
    """

    engine: str = "hf"
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 256
    source: Literal["inprocess", "stream"] = "inprocess"
    mode: Literal["sync", "async"] = "sync"
    max_staleness: int = 1

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError("rollout.n must be >= 1 (use >= 2 for GRPO advantages)")
        if self.temperature < 0:
            raise ConfigError("rollout.temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError("rollout.top_p must be in (0, 1]")
        if self.max_staleness < 0:
            raise ConfigError("rollout.max_staleness must be >= 0")
        if self.mode == "async" and self.max_staleness < 1:
            raise ConfigError("rollout.mode=async needs rollout.max_staleness >= 1 (groups of the previous policy "
                              "version); use rollout.mode=sync for on-policy groups")
        if self.mode == "async" and self.source != "stream":
            raise ConfigError("rollout.mode=async needs rollout.source=stream (rollout workers generate while the "
                              "trainer trains). Fix: set rollout.source=stream or rollout.mode=sync")
