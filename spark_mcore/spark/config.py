from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from spark_mcore.config.loader import ConfigError


@dataclass
class SparkConfig:
    """SPARK: recycle verified policy groups into reward-model tasks for the same model.

    enabled: False trains plain GRPO (the baseline); nothing is recycled.
    schedule: "alternate" = once the cache holds `reward_batch_size` samples, the step after a
        policy step is a reward step that trains only on cached reward samples (≈1:1, the
        public recipe); "mixed" = every step is a policy step and cached reward samples join
        its batch, `mixed_ratio` of them per policy prompt.
    mixed_ratio: in "mixed", reward prompts added per policy prompt (0.5 with 16 prompts per
        step adds up to 8 reward prompts; fewer when the cache holds fewer).
    pointwise_prob_mixed: a group with both right and wrong responses becomes a pointwise
        task with this probability (on a right or a wrong response, 50/50), else pairwise.
    judge_per_prompt / reflection_per_prompt: caps per recycle call (one policy step), as a
        fraction of the step's groups: at most ceil(fraction * groups) judge (pointwise +
        pairwise) and reflection samples. 0.5 gives the recipe's 32 + 32 per 64 prompts.
        Each group yields at most one judge and one reflection sample, hence the range [0, 1].
    content_mode: what a task shows of a response: "answer" = its final boxed answer only,
        "cot" = the full response, "both" = either, 50/50 per sample.
    reward_batch_size: prompts per reward step (each sampled rollout.n times); 0 = the same
        as data.prompts_per_step.
    cache_max: reward samples kept waiting; the oldest are dropped (and counted) beyond it.
    max_shown_chars: longest response text shown in a task; a longer one keeps its last
        characters (where the final answer is) after a "..." marker. 0 = no limit.
    seed: template and sample selection; recycling is deterministic for (seed, step).
    judge_check: judge tasks recycled from a source task with a registered check writer
        (`spark_mcore.rewards.judge_check`; countdown) are scored by the `judge_check` verifier:
        the verdict AND the written check before it, against the reference check of the shown
        response(s), instead of the verdict alone. Other tasks keep the `judge` verifier.
    judge_check_weight: with judge_check, the share of the reward given to the written check
        (step agreement, 0..1); the verdict gets the rest. Full credit needs both right.
    reward_lr_scale: a reward step's learning rate is this times the scheduled one (policy
        steps keep it), so reward steps can move the shared weights more gently; 1.0 = the paper.
    check_demo: with judge_check, each reward step adds to every judge_check group one more
        member, the reference check and the right verdict, scored like a sample, so GRPO trains
        on it with the group's advantage (`spark/demos.py`). A DEVIATION from the paper's pure
        on-policy reward steps (self-training on verified labels); off by default.
    judge_balance: per recycle call, pointwise tasks of the majority label ("Yes" or "No") are
        dropped (a seeded subset) until both labels are equally many, so a judge that answers
        one constant verdict scores 50 % on them (pairwise labels are already 50/50).
    reward_filter_zero_variance: in a reward step, groups whose rewards are all equal (a judge
        task every sample gets right, a reflection task every sample fails) are left out of the
        GRPO batch, so they do not dilute the token-mean loss of the informative ones (DAPO's
        dynamic sampling, without its oversampling). A DEVIATION from the paper, which trains
        on the whole reward batch; policy steps keep `algo.filter_zero_variance`. Off by default.
    reward_n: responses sampled per reward task in a reward step ("alternate" schedule); 0 =
        rollout.n, as for policy prompts. More samples per task give a reward step more groups
        with a spread of rewards (a judge right 85 % of the time gets all 8 of 8 right on ~27 %
        of tasks, all 16 of 16 on ~7 %) from the same cached tasks; policy steps, and so the
        policy's rollout budget, are unchanged. Not with "mixed" (one batch, one n).
    reward_kl_coef: the KL coefficient of a reward step's GRPO loss (None = algo.kl_coef, as in
        policy steps). The KL is to the frozen warm start, so a larger value anchors the judge
        and reflection outputs that reward steps sample to the warm start's, pulling back the
        drift that policy steps cause in them; policy steps keep algo.kl_coef. A DEVIATION from
        the paper (one loss for both kinds of step). Needs algo.kl_coef > 0 (the reference).
    """

    enabled: bool = False
    schedule: Literal["alternate", "mixed"] = "alternate"
    mixed_ratio: float = 0.5
    pointwise_prob_mixed: float = 0.3
    judge_per_prompt: float = 0.5
    reflection_per_prompt: float = 0.5
    content_mode: Literal["answer", "cot", "both"] = "both"
    reward_batch_size: int = 0
    cache_max: int = 4096
    max_shown_chars: int = 0
    seed: int = 0
    judge_check: bool = False
    judge_check_weight: float = 0.5
    judge_balance: bool = False
    check_demo: bool = False
    reward_lr_scale: float = 1.0
    reward_filter_zero_variance: bool = False
    reward_n: int = 0
    reward_kl_coef: float | None = None

    def __post_init__(self) -> None:
        if self.schedule not in ("alternate", "mixed"):
            raise ConfigError(f"spark.schedule: {self.schedule!r} is not one of 'alternate', 'mixed'")
        if self.content_mode not in ("answer", "cot", "both"):
            raise ConfigError(
                f"spark.content_mode: {self.content_mode!r} is not one of 'answer', 'cot', 'both'"
            )
        if not 0.0 < self.mixed_ratio <= 4.0:
            raise ConfigError(
                f"spark.mixed_ratio must be in (0, 4] reward prompts per policy prompt, got {self.mixed_ratio}"
            )
        for name in ("pointwise_prob_mixed", "judge_per_prompt", "reflection_per_prompt", "judge_check_weight"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"spark.{name} must be in [0, 1], got {value}")
        if self.reward_batch_size < 0:
            raise ConfigError("spark.reward_batch_size must be >= 0 (0 = data.prompts_per_step)")
        if self.cache_max < 1:
            raise ConfigError("spark.cache_max must be >= 1 (and at least the reward batch size)")
        if not 0.0 < self.reward_lr_scale <= 10.0:
            raise ConfigError(f"spark.reward_lr_scale must be in (0, 10], got {self.reward_lr_scale}")
        if self.check_demo and not self.judge_check:
            raise ConfigError("spark.check_demo needs spark.judge_check: true (the demonstration is the reference "
                              "check that judge_check tasks carry)")
        if self.max_shown_chars < 0:
            raise ConfigError("spark.max_shown_chars must be >= 0 (0 = no limit)")
        if self.reward_n < 0 or self.reward_n == 1:
            raise ConfigError(f"spark.reward_n must be 0 (= rollout.n) or >= 2 (a group needs two samples to "
                              f"have an advantage), got {self.reward_n}")
        if self.reward_kl_coef is not None and not 0.0 <= self.reward_kl_coef <= 10.0:
            raise ConfigError(f"spark.reward_kl_coef must be in [0, 10], or null for algo.kl_coef; "
                              f"got {self.reward_kl_coef}")
        if self.reward_n and self.schedule == "mixed":
            raise ConfigError("spark.reward_n needs spark.schedule: alternate (a mixed step samples its policy and "
                              "reward prompts in one batch with rollout.n); set spark.reward_n: 0")

    def resolve_reward_batch_size(self, prompts_per_step: int) -> int:
        """Prompts per reward step; checks that the cache can ever hold that many."""
        if prompts_per_step < 1:
            raise ConfigError("data.prompts_per_step must be >= 1")
        size = self.reward_batch_size or prompts_per_step
        if self.cache_max < size:
            raise ConfigError(
                f"spark.cache_max ({self.cache_max}) is smaller than the reward batch ({size}): "
                "raise spark.cache_max or lower spark.reward_batch_size"
            )
        return size

    def samples_per_task(self, kind: str, rollout_n: int) -> int:
        """Responses per prompt in a step of `kind` ("policy" or "reward"): `reward_n` in a
        reward step when set, else `rollout_n`."""
        return self.reward_n if kind == "reward" and self.reward_n else rollout_n

    def drops_flat_groups(self, kind: str, algo_filter: bool) -> bool:
        """Whether a step of `kind` leaves zero-variance groups out of its GRPO batch:
        `algo.filter_zero_variance` (`algo_filter`) in every step, plus
        `reward_filter_zero_variance` in reward steps."""
        return algo_filter or (kind == "reward" and self.reward_filter_zero_variance)

    def kl_coef(self, kind: str, algo_kl_coef: float) -> float:
        """The KL coefficient of a step of `kind`: `reward_kl_coef` in a reward step when set,
        else `algo_kl_coef`."""
        return self.reward_kl_coef if kind == "reward" and self.reward_kl_coef is not None else algo_kl_coef

    def caps(self, num_groups: int) -> tuple[int, int]:
        """(max judge samples, max reflection samples) for a step with `num_groups` groups."""

        def cap(fraction: float) -> int:
            # the small epsilon keeps 0.5 * 64 at 32 despite float rounding
            return min(num_groups, math.ceil(fraction * num_groups - 1e-9))

        return cap(self.judge_per_prompt), cap(self.reflection_per_prompt)
