from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from spark_mcore.config.loader import ConfigError, check_ranges


@dataclass
class DataConfig:
    """Prompt data.

    source: "builtin:arith" (the procedural arithmetic task) or a path to a JSONL file (or
        .parquet when pyarrow is installed) whose rows are
        {"prompt" | "messages", "answer", "images"?, "task"?, "id"?}.
    eval_source: held-out prompts for `eval`; None means the test split of a builtin source.
    levels: difficulty levels of the builtin arith task (1 = easiest).
    train_size / test_size: number of builtin problems per split (disjoint by construction).
        A split repeats problems (with a warning) once a level's distinct pool is used up:
        levels 1-4 hold about 1.5k / 9.9k / 1.2k / 11.7k train and 0.4k / 2.3k / 0.3k / 2.9k
        test problems.
    prompts_per_step: prompts per policy step (each sampled `rollout.n` times).
    max_prompt_tokens: longer prompts are rejected (error) or skipped, per `on_bad_row`.
    on_bad_row: what a malformed dataset row does: stop with its line number, or skip it.
    tokenizer: path to a Hugging Face tokenizer directory; None builds the small built-in one.
    seed: order of prompts and builtin problem generation.
    """

    source: str = "builtin:arith"
    eval_source: str | None = None
    levels: list[int] = field(default_factory=lambda: [1, 2])
    train_size: int = 20000
    test_size: int = 200
    prompts_per_step: int = 16
    max_prompt_tokens: int = 256
    on_bad_row: Literal["error", "skip"] = "error"
    tokenizer: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_ranges("data", self, {"train_size": ">= 1", "test_size": ">= 1", "max_prompt_tokens": ">= 1"})
        if self.prompts_per_step < 1:
            raise ConfigError("data.prompts_per_step must be >= 1")
        if not self.levels:
            raise ConfigError("data.levels must name at least one difficulty level, e.g. [1, 2]")
