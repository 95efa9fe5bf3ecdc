"""Prompts of a vision-language run: token ids with expanded image pads and processed images,
from one place, so the engine's input and the trainer's batch rows always agree.

`VisionPromptEncoder.encode(prompt)` is the run's `encode` (text prompts as `encode_prompt`);
`images(prompt)` the processed (pixel_values, image_grid_thw) of its images or None. Processed
images are cached by the prompt's image references (a recycled judge / reflection prompt
shares its source's images, so they are decoded once), least recently used first out.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from spark_mcore.config.loader import ConfigError
from spark_mcore.data.chat import encode_prompt
from spark_mcore.data.images import (
    IMAGE_PAD,
    VISION_END,
    VISION_START,
    ImageDecoder,
    PilDecoder,
    ProcessedImages,
    VisionProcessing,
    expand_image_pads,
    placeholder_ids,
    process_images,
)
from spark_mcore.types import Prompt

VISION_TOKENS = (VISION_START, IMAGE_PAD, VISION_END, "<|video_pad|>")


def add_vision_tokens(tokenizer: Any) -> dict[str, int]:
    """Make sure the tokenizer knows the Qwen2.5-VL vision tokens (the built-in tokenizer does
    not: they are appended as special tokens); returns their ids by token."""
    missing = [t for t in VISION_TOKENS if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    return {t: int(tokenizer.convert_tokens_to_ids(t)) for t in VISION_TOKENS}


def check_token_ids(ids: dict[str, int], vision: Any) -> None:
    """ConfigError when the model's vision token ids are not the tokenizer's."""
    want = {"image_token_id": ids[IMAGE_PAD], "vision_start_token_id": ids[VISION_START],
            "vision_end_token_id": ids[VISION_END]}
    wrong = {k: v for k, v in want.items() if getattr(vision, k) != v}
    if wrong:
        fix = ", ".join(f"model.vision.{k}={v}" for k, v in wrong.items())
        have = ", ".join(f"{k}={getattr(vision, k)}" for k in wrong)
        raise ConfigError(f"the model's vision token ids ({have}) are not the tokenizer's. Fix: {fix}")


class VisionPromptEncoder:
    """Token ids and processed images of prompts (see the module docstring)."""

    def __init__(self, tokenizer: Any, processing: VisionProcessing,
                 decoder: ImageDecoder | None = None, cache_size: int = 1024) -> None:
        self.tokenizer = tokenizer
        self.processing = processing
        self.decoder = decoder
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, ...], ProcessedImages] = OrderedDict()

    def _processed(self, prompt: Prompt) -> tuple[list[int], ProcessedImages | None]:
        if not prompt.images:
            return encode_prompt(self.tokenizer, prompt), None
        key = tuple(prompt.images)
        processed = self._cache.get(key)
        if processed is None:
            decoder = self.decoder or PilDecoder()
            processed = process_images(decoder.decode(prompt.images), self.processing)
            self._cache[key] = processed
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        ids, pad_id = placeholder_ids(self.tokenizer, prompt)
        return expand_image_pads(ids, pad_id, processed.tokens_per_image(self.processing.merge_size)), processed

    def encode(self, prompt: Prompt) -> list[int]:
        return self._processed(prompt)[0]

    # The run's `encode` callable: code that only encodes sees a function of a Prompt; code
    # that feeds an engine or builds batches also finds `images` (rollout.groups, train).
    __call__ = encode

    def images(self, prompt: Prompt) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not prompt.images:
            return None
        _, processed = self._processed(prompt)
        assert processed is not None
        return processed.pixel_values, processed.image_grid_thw


def vision_prompt_encoder(tokenizer: Any, vision: Any, data: Any) -> VisionPromptEncoder:
    """The `encode` of a vision-language run (trainer and rollout workers alike): the tokenizer
    gets the vision tokens, which must be the model's (`vision`: model.vision), and images are
    processed with the tower's patch sizes and `data.image_min_pixels` / `image_max_pixels`."""
    from spark_mcore.data.images import get_decoder

    check_token_ids(add_vision_tokens(tokenizer), vision)
    processing = VisionProcessing(vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size,
                                  data.image_min_pixels, data.image_max_pixels)
    return VisionPromptEncoder(tokenizer, processing, get_decoder(data.image_decoder))


__all__ = ["VISION_TOKENS", "VisionPromptEncoder", "add_vision_tokens", "check_token_ids", "vision_prompt_encoder"]
