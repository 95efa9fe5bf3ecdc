"""Which step comes next: a policy step, a reward step, or a policy step with reward samples
mixed in. Pure: the decision depends only on the config, the cache size and the last step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from spark_mcore.spark.config import SparkConfig

StepKind = Literal["policy", "reward"]


@dataclass(frozen=True)
class StepPlan:
    """kind "reward": train GRPO on `reward_samples` cached samples only (no new prompts).
    kind "policy": a policy step on fresh prompts plus `reward_samples` cached samples mixed in
    (0 except in the "mixed" schedule)."""

    kind: StepKind
    reward_samples: int = 0


class SparkSchedule:
    """Decides the next step after each step (see `next_step`)."""

    def __init__(self, cfg: SparkConfig, prompts_per_step: int) -> None:
        self.cfg = cfg
        self.prompts_per_step = prompts_per_step
        self.reward_batch_size = cfg.resolve_reward_batch_size(prompts_per_step)
        # at least one reward prompt when mixing, so a tiny ratio still mixes something
        self.mix_target = max(1, round(cfg.mixed_ratio * prompts_per_step))

    def next_step(self, cache_size: int, last_kind: StepKind | None) -> StepPlan:
        """The plan for the step after one of kind `last_kind` (None = the first step).

        disabled:  always a plain policy step.
        alternate: a reward step right after a policy step once the cache holds a full reward
                   batch; never two reward steps in a row (samples come only from policy steps).
        mixed:     always a policy step with min(cache_size, mix_target) reward samples.
        """
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        if last_kind not in (None, "policy", "reward"):
            raise ValueError(f"last_kind must be 'policy', 'reward' or None, got {last_kind!r}")
        if not self.cfg.enabled:
            return StepPlan("policy", 0)
        if self.cfg.schedule == "mixed":
            return StepPlan("policy", min(cache_size, self.mix_target))
        if last_kind == "policy" and cache_size >= self.reward_batch_size:
            return StepPlan("reward", self.reward_batch_size)
        return StepPlan("policy", 0)
