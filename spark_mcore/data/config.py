from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from spark_mcore.config.loader import ConfigError, check_ranges


@dataclass
class DataConfig:
    """Prompt data.

    source: "builtin:arith" (the procedural arithmetic task), "builtin:countdown" (reach a target
        from 3-5 numbers, `spark_mcore.data.countdown`), "builtin:shapes" (procedural images,
        for vision-language models) or a path to a JSONL file (or
        .parquet when pyarrow is installed) whose rows are
        {"prompt" | "messages", "answer", "images"?, "task"?, "id"?}.
    eval_source: held-out prompts for `eval`; None means the test split of a builtin source.
    levels: difficulty levels of the builtin task: arith 1-4 (1 = easiest); countdown 3-5 (the
        count of numbers shown).
    train_size / test_size: number of builtin problems per split (disjoint by construction).
        A split repeats problems (with a warning) once a level's distinct pool is used up:
        levels 1-4 hold about 1.5k / 9.9k / 1.2k / 11.7k train and 0.4k / 2.3k / 0.3k / 2.9k
        test problems.
    prompts_per_step: prompts per policy step (each sampled `rollout.n` times).
    max_prompt_tokens: longer prompts are rejected (error) or skipped, per `on_bad_row`.
    on_bad_row: what a malformed dataset row does: stop with its line number, or skip it.
    tokenizer: path to a Hugging Face tokenizer directory; None builds the small built-in one.
    seed: order of prompts and builtin problem generation.
    image_decoder: "pil" (CPU) or "dali" (NVIDIA DALI, GPU; must be installed) for the images
        of vision-language rows (`spark_mcore.data.images`).
    image_min_pixels / image_max_pixels: pixel budget of one image after the Qwen2.5-VL
        processor's resize (each image becomes h*w / (14*14*4) tokens at the 7B/32B sizes).
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
    image_decoder: Literal["pil", "dali"] = "pil"
    image_min_pixels: int = 56 * 56
    image_max_pixels: int = 28 * 28 * 1280

    def __post_init__(self) -> None:
        check_ranges("data", self, {"train_size": ">= 1", "test_size": ">= 1", "max_prompt_tokens": ">= 1"})
        if self.prompts_per_step < 1:
            raise ConfigError("data.prompts_per_step must be >= 1")
        if self.image_decoder == "dali":  # fail at config time, naming the install
            from spark_mcore.data.images import require_dali

            require_dali()
        if not 0 < self.image_min_pixels <= self.image_max_pixels:
            raise ConfigError("data.image_min_pixels must be > 0 and <= data.image_max_pixels")
        if not self.levels:
            raise ConfigError("data.levels must name at least one difficulty level, e.g. [1, 2]")
