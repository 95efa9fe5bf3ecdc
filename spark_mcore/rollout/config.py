from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from spark_mcore.config.loader import ConfigError, check_ranges


@dataclass
class PrefixConfig:
    """Prefix-RFT (arXiv 2507.01679): some members of each group continue from a prefix of the
    prompt's demonstration (the dataset row's "solution" field, or the builtin task's worked
    solution; prompts without one are rolled out on-policy). The prefix tokens join the
    response under a prefix mask; a group with a prefixed member takes Dr. GRPO's baseline
    (r - mean, no std); prefix tokens are trained with the advantage-weighted log-likelihood
    (no ratio, no clip), on-policy tokens with PPO-clip (`spark_mcore.algo.prefix`,
    `spark_mcore.rollout.prefix`). In-process rollouts only (rollout.source=inprocess).

    enabled: turn prefix rollouts on.
    members: members of each group of rollout.n that get a prefix (the rest are on-policy);
        must be < rollout.n.
    high_start / high_end, low_start / low_end: the prefix fraction p of each prefixed member
        is drawn uniformly from [low, high]; each bound follows a cosine decay from its start to
        its end value over schedule_steps policy steps, then stays at the end value. The paper
        reports a cosine decay from 0.95 to 0.05 (the high bound here); the low bound's
        schedule is not confirmed.
    schedule_steps: length of the decay in policy steps; 0 means trainer.steps.
    entropy_keep: share of the batch's prefix tokens, the highest-entropy ones, that keep their
        advantage in the prefix loss (the others contribute 0); the paper uses 0.2.
    """

    enabled: bool = False
    members: int = 1
    high_start: float = 0.95
    high_end: float = 0.05
    low_start: float = 0.05
    low_end: float = 0.05
    schedule_steps: int = 0
    entropy_keep: float = 0.2

    def __post_init__(self) -> None:
        for name in ("high_start", "high_end", "low_start", "low_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"rollout.prefix.{name} must be in [0, 1] (a fraction of the "
                                  f"demonstration), got {getattr(self, name)}")
        if self.low_start > self.high_start or self.low_end > self.high_end:
            raise ConfigError("rollout.prefix: low_start/low_end must be <= high_start/high_end")
        if not 0.0 < self.entropy_keep <= 1.0:
            raise ConfigError("rollout.prefix.entropy_keep must be in (0, 1] (paper: 0.2), "
                              f"got {self.entropy_keep}")
        if self.members < 0 or self.schedule_steps < 0:
            raise ConfigError("rollout.prefix.members and rollout.prefix.schedule_steps must be >= 0")


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
    prefix: Prefix-RFT demonstration prefixes (`PrefixConfig`; off by default).
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
    prefix: PrefixConfig = field(default_factory=PrefixConfig)

    def __post_init__(self) -> None:
        check_ranges("rollout", self, {"max_new_tokens": ">= 1", "batch_size": ">= 1"})
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
        if self.prefix.enabled and self.prefix.members >= self.n:
            raise ConfigError(f"rollout.prefix.members={self.prefix.members} must be < rollout.n={self.n} "
                              "(a group needs on-policy members)")
        if self.prefix.enabled and self.source != "inprocess":
            raise ConfigError("rollout.prefix.enabled=true needs rollout.source=inprocess (rollout workers do not "
                              "generate demonstration prefixes yet); set rollout.source=inprocess or "
                              "rollout.prefix.enabled=false")
