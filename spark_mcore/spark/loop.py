"""SPARK's bookkeeping inside the training loop: recycle policy groups into a cache of reward
tasks, and plan each step (policy step, reward step, or policy step with reward tasks mixed in)."""

from __future__ import annotations

from typing import Any

from spark_mcore.spark.cache import RewardCache
from spark_mcore.spark.config import SparkConfig
from spark_mcore.spark.recycler import Recycler
from spark_mcore.spark.schedule import SparkSchedule, StepKind, StepPlan
from spark_mcore.types import KIND_KEY, Prompt, RewardSample, Rollout, RolloutGroup, prompt_kind


class SparkState:
    """Recycler + cache + schedule. With `enabled: false` every step is a plain policy step."""

    def __init__(self, cfg: SparkConfig, prompts_per_step: int) -> None:
        self.cfg = cfg
        self.recycler = Recycler(cfg)
        self.cache = RewardCache(cfg.cache_max)
        self.schedule = SparkSchedule(cfg, prompts_per_step)
        self.last_kind: StepKind | None = None

    def plan(self) -> tuple[StepPlan, list[Prompt]]:
        """The next step's plan and the cached reward-task prompts it consumes."""
        plan = self.schedule.next_step(len(self.cache), self.last_kind)
        return plan, [s.prompt for s in self.cache.pop(plan.reward_samples)]

    def peek(self) -> tuple[bool, list[Prompt]]:
        """What the next `plan()` will ask for, taking nothing now: (a policy step?, its reward-
        task prompts). A rollout source may start on them while the current step trains."""
        plan = self.schedule.next_step(len(self.cache), self.last_kind)
        return plan.kind == "policy", [s.prompt for s in self.cache.peek(plan.reward_samples)]

    def after_step(self, plan: StepPlan, groups: list[RolloutGroup], step: int,
                   candidates: list[list[RewardSample]] | None = None) -> dict[str, float]:
        """Recycles the policy groups of a policy step (reward tasks only come from those).
        `candidates[i]`: group i's tasks already recycled by a rollout worker (then only the
        per-step caps are applied here, with the same seeds as recycling here would use)."""
        self.last_kind = plan.kind
        stats: dict[str, float] = {}
        if plan.kind == "policy" and self.cfg.enabled:
            policy = [i for i, g in enumerate(groups) if KIND_KEY not in g.prompt.meta]
            if candidates is None:
                self.cache.add(self.recycler.recycle([groups[i] for i in policy], step))
            else:
                self.cache.add(self.recycler.select([candidates[i] for i in policy], step))
            stats.update({k: float(v) for k, v in self.recycler.last_stats.items()})
        stats["spark/cache_size"] = float(len(self.cache))
        stats["spark/cache_dropped"] = float(self.cache.dropped)
        return stats

    def total_updates(self, policy_steps: int) -> int:
        """Optimizer steps to plan the LR schedule for (alternate ~ one reward step per policy step)."""
        if self.cfg.enabled and self.cfg.schedule == "alternate":
            return 2 * policy_steps
        return policy_steps

    def state_dict(self) -> dict[str, Any]:
        return {"cache": self.cache.state_dict(), "last_kind": self.last_kind}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cache.load_state_dict(state["cache"])
        self.last_kind = state.get("last_kind")


def kind_metrics(rollouts: list[Rollout]) -> dict[str, float]:
    """Mean reward per task kind in a batch; judge accuracy = mean reward of judge tasks. With
    tasks scored on their written check too (`spark.judge_check`), also the share of right
    verdicts alone, `judge_verdict_accuracy`."""
    out: dict[str, float] = {}
    by_kind: dict[str, list[float]] = {}
    for r in rollouts:
        by_kind.setdefault(prompt_kind(r.prompt), []).append(r.reward)
    for kind, rewards in by_kind.items():
        out[f"reward_{kind}"] = sum(rewards) / len(rewards)
    judge = by_kind.get("pointwise", []) + by_kind.get("pairwise", [])
    if judge:
        out["judge_accuracy"] = sum(judge) / len(judge)
    from spark_mcore.rewards.judge_check import JUDGE_CHECK_TASK, verdict_label  # lazy, as in the recycler

    checked = [r for r in rollouts if r.prompt.task == JUDGE_CHECK_TASK]
    if checked:
        from spark_mcore.rewards.verifiers import judge_verifier

        verdicts = [judge_verifier(r.completion.text, verdict_label(r.prompt.answer)) for r in checked]
        out["judge_verdict_accuracy"] = sum(verdicts) / len(verdicts)
    if "reflection" in by_kind:
        out["reflection_success"] = out["reward_reflection"]
    return out
