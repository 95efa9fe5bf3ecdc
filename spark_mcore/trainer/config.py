from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from spark_mcore.config.loader import ConfigError, check_ranges
from spark_mcore.types import REWARD_KINDS


@dataclass
class TrainerConfig:
    """Megatron actor optimisation.

    steps: policy (RL) steps.
    lr / min_lr_ratio / warmup_ratio: cosine schedule from lr to lr*min_lr_ratio after a
        linear warmup over warmup_ratio*steps.
    micro_batch_size: sequences per forward/backward (gradient accumulation up to the batch).
    max_tokens_per_micro_batch: token budget per micro-batch (rows x padded length); 0 = off.
        With it, long batches get smaller micro-batches so activation memory stays bounded.
    pack_sequences: padding-free micro-batches. Sequences are packed first-fit-decreasing into
        rows of max_tokens_per_micro_batch tokens (one row per micro-batch), or, when that is 0,
        of the longest sequence's length (micro_batch_size rows per micro-batch, which then
        counts rows, not sequences); a sequence longer than the budget widens every row to its
        length. With 0 only sequences shorter than half the longest can share a row, so set a
        budget of a few times the longest sequence to save the padding (arith GRPO batch,
        tools/bench_packing.py: 19350 padded token positions -> 15360 packed at 512). Each sequence restarts its positions at 0 and attends only to itself
        (block-diagonal causal mask), so losses and log-probs equal the padded path's; the
        model computes only the tokens up to each sequence's last response token plus row
        tails. Local (non-TE) layer spec, which the actor builds: an explicit [R, 1, L, L]
        mask (attention cost stays L^2 per row, so very long rows trade padding for attention
        work; megatron's fused softmax is turned off because it ignores the mask). A model built
        with the Transformer Engine spec (GPU) takes megatron's THD layout with cu_seqlens
        instead (`spark_mcore.models.packed`); that branch is written but untested, since TE
        does not run on the CPU test machines. Not with parallel.cp > 1.
    updates_per_step: optimizer steps per policy step (the batch is split into this many).
    seed: model init and sampling seed.
    fp8: FP8 GEMMs through Transformer Engine (megatron TransformerConfig.fp8): null = off,
        "hybrid" = e4m3 forward, e5m2 gradients (the usual choice), "e4m3" = e4m3 everywhere.
        Needs model.transformer_impl=transformer_engine (or auto with TE), model.dtype bf16 or
        fp16, and a GPU of compute capability >= 8.9; checked when the run config loads.
    fp8_recipe: TransformerConfig.fp8_recipe: "delayed" (amax history), "tensorwise" (current
        per-tensor scaling), "blockwise", "mxfp8" (Blackwell only).
    fp8_margin / fp8_amax_history_len / fp8_amax_compute_algo: the delayed recipe's scaling
        factor margin (power of 2), amax window and how the window is reduced ("max" or
        "most_recent"); passed to the same-named TransformerConfig fields.
    """

    steps: int = 30
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    micro_batch_size: int = 64
    max_tokens_per_micro_batch: int = 0
    pack_sequences: bool = False
    updates_per_step: int = 1
    seed: int = 1234
    fp8: Literal["hybrid", "e4m3"] | None = None
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    fp8_margin: int = 0
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"

    def __post_init__(self) -> None:
        check_ranges("trainer", self, {
            "min_lr_ratio": "in [0, 1]", "warmup_ratio": "in [0, 1]", "weight_decay": ">= 0",
            "adam_beta1": "in [0, 1)", "adam_beta2": "in [0, 1)", "adam_eps": "> 0", "grad_clip": ">= 0"})
        if self.steps < 0:
            raise ConfigError("trainer.steps must be >= 0")
        if self.lr <= 0:
            raise ConfigError("trainer.lr must be > 0")
        if self.micro_batch_size < 1 or self.updates_per_step < 1:
            raise ConfigError("trainer.micro_batch_size and trainer.updates_per_step must be >= 1")
        if self.max_tokens_per_micro_batch < 0:
            raise ConfigError(f"trainer.max_tokens_per_micro_batch={self.max_tokens_per_micro_batch} must be "
                              ">= 0 (0 turns the token budget off)")
        if self.fp8_margin < 0 or self.fp8_amax_history_len < 1:
            raise ConfigError("trainer.fp8_margin must be >= 0 and trainer.fp8_amax_history_len >= 1")

    def fp8_overrides(self) -> dict[str, object]:
        """megatron TransformerConfig fields for trainer.fp8 (empty when FP8 is off)."""
        if self.fp8 is None:
            return {}
        return {"fp8": self.fp8, "fp8_recipe": self.fp8_recipe, "fp8_margin": self.fp8_margin,
                "fp8_amax_history_len": self.fp8_amax_history_len,
                "fp8_amax_compute_algo": self.fp8_amax_compute_algo}


@dataclass
class WarmStartConfig:
    """Supervised warm start on worked solutions before RL (the tiny demo has no pretrained
    model to download). steps 0 skips it.

    judge_fraction: share of the SFT examples that are SPARK-format reward tasks (pointwise,
        pairwise, reflection, with balanced labels; `spark_mcore.spark.warmstart_data`) built
        from right and wrong worked solutions of the training prompts, so that a model trained
        from scratch can follow judge prompts a little before RL, as a pretrained one does.
        Keep it small (0.2-0.3) so that RL on the judge tasks still has room to improve.
        Needs builtin arith or countdown prompts; 0 trains on worked solutions only.
    judge_file: JSONL of judge rows built from a model's OWN verified answers on training
        prompts (`spark_mcore.spark.own_judge`; written by `tools/compare_spark_grpo.py
        --own-judge-samples` between two warm-start stages). "" = none. Needs judge_fraction > 0.
    judge_file_share: share of the judge-batch examples taken from `judge_file` (the rest are
        the synthetic reward tasks above, reflection included).
    drill_share: share of the worked-solution examples replaced by arithmetic drill rows
        (`Compute: 7*3, 21-5.` -> `7*3=21. 21-5=16.`, `spark_mcore.data.drill`): every
        one-step fact with values up to `drill_bound`, so that a small model's steps are right
        and its wrong answers are search errors a judge can catch. 0 = none.
    drill_bound: the largest operand and value of a drill fact (countdown levels 1-2: 30).
    drill_compare: share of the drill rows that compare a value with a target digit by digit
        in the written check's format (`Compare: 27 vs 18.` -> `27 vs 18: 2 vs 1, differ.`,
        `spark_mcore.data.drill.compare_examples`), so a judge learns the decision from the
        digits, not from the response it checks. 0 = none (needs drill_share > 0).
    drill_compare_bound: the largest target of a comparison drill pair (values range over 0..it).
        99 (rounds nine to eleven) makes 91 % of the pairs two-digit; countdown's checks compare
        values with targets of 1..30, a third of them one digit, and a judge drilled at 99 wrote
        `4 vs 6: 4 vs 6, same.` (round twelve). 30 drills that range.
    judge_kinds: which kinds of synthetic reward tasks fill the judge batches that `judge_file`
        does not (a subset of pointwise, pairwise, reflection). Synthetic judge targets are bare
        verdicts, so a stage that should keep an own-judge model's written checks lists only
        ["reflection"]: it teaches "correct the previous solution" -> a worked solution.
    """

    steps: int = 0
    lr: float = 1e-3
    batch_size: int = 64
    warmup_steps: int = 20
    judge_fraction: float = 0.0
    judge_file: str = ""
    judge_file_share: float = 0.5
    drill_share: float = 0.0
    drill_bound: int = 30
    drill_compare: float = 0.0
    drill_compare_bound: int = 99
    judge_kinds: list[str] = field(default_factory=lambda: list(REWARD_KINDS))

    def __post_init__(self) -> None:
        if not self.judge_kinds or any(k not in REWARD_KINDS for k in self.judge_kinds):
            raise ConfigError(f"warmstart.judge_kinds must be a non-empty subset of {list(REWARD_KINDS)}, "
                              f"got {self.judge_kinds}")
        check_ranges("warmstart", self, {"lr": "> 0", "warmup_steps": ">= 0"})
        if self.steps < 0 or self.batch_size < 1:
            raise ConfigError("warmstart.steps must be >= 0 and warmstart.batch_size >= 1")
        if not 0.0 <= self.judge_fraction < 1.0:
            raise ConfigError(
                f"warmstart.judge_fraction must be in [0, 1) (a share of the SFT examples), "
                f"got {self.judge_fraction}"
            )
        if not 0.0 <= self.judge_file_share <= 1.0:
            raise ConfigError(f"warmstart.judge_file_share must be in [0, 1], got {self.judge_file_share}")
        if not 0.0 <= self.drill_share < 1.0 or self.drill_bound < 1:
            raise ConfigError(f"warmstart.drill_share must be in [0, 1) and warmstart.drill_bound >= 1, got "
                              f"{self.drill_share} and {self.drill_bound}")
        if not 0.0 <= self.drill_compare <= 1.0 or (self.drill_compare > 0 and self.drill_share <= 0):
            raise ConfigError(f"warmstart.drill_compare must be in [0, 1] and needs warmstart.drill_share > 0, got "
                              f"{self.drill_compare} with drill_share {self.drill_share}")
        if self.drill_compare_bound < 1:
            raise ConfigError(f"warmstart.drill_compare_bound must be >= 1 (the largest target of a comparison "
                              f"drill pair), got {self.drill_compare_bound}")
        if self.judge_file and self.judge_fraction <= 0:
            raise ConfigError("warmstart.judge_file needs warmstart.judge_fraction > 0 (the share of judge "
                              "batches its rows go into); set judge_fraction or clear judge_file")
