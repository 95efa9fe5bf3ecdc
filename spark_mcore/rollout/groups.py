"""Prompts -> rollout groups through any engine, and verification of the groups."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from spark_mcore.config.loader import ConfigError
from spark_mcore.models.vision import VisionInputs
from spark_mcore.rollout.base import RolloutEngine, SamplingParams
from spark_mcore.types import Completion, Prompt, Rollout, RolloutGroup


def engine_generate(engine: RolloutEngine, prompts: Sequence[Prompt], prompt_ids: list[list[int]],
                    encode: Callable[[Prompt], list[int]], params: SamplingParams) -> list[list[Completion]]:
    """`engine.generate` of the prompts' ids, with their processed images when `encode` is a
    vision-language encoder (data.vision_prompts.VisionPromptEncoder: it also has `images`)."""
    images_of = getattr(encode, "images", None)
    images = [images_of(p) for p in prompts] if images_of is not None else []
    if not any(i is not None for i in images):
        return engine.generate(prompt_ids, params)
    if not getattr(engine, "takes_images", False):
        raise ConfigError(f"the rollout engine {type(engine).__name__} does not take images yet; "
                          "use the transformers engine (rollout.engine: hf) for image prompts")
    vision = [None if i is None else VisionInputs(*i) for i in images]
    return engine.generate(prompt_ids, params, images=vision)  # type: ignore[call-arg]


def generate_groups(engine: RolloutEngine, prompts: list[Prompt], encode: Callable[[Prompt], list[int]],
                    params: SamplingParams) -> list[RolloutGroup]:
    """Samples `params.n` completions per prompt; each rollout carries the engine's policy
    version. Image prompts: see `engine_generate`."""
    prompt_ids = [encode(p) for p in prompts]
    outputs = engine_generate(engine, prompts, prompt_ids, encode, params)
    if len(outputs) != len(prompts):
        raise RuntimeError(f"engine returned {len(outputs)} groups for {len(prompts)} prompts")
    version = engine.policy_version
    return [
        RolloutGroup(prompt=p, rollouts=[Rollout(p, ids, c, policy_version=version) for c in comps])
        for p, ids, comps in zip(prompts, prompt_ids, outputs, strict=False)
    ]


def score_groups(groups: list[RolloutGroup], score: Callable[[list[tuple[str, str, str]]], list[float]]) -> None:
    """Fills `reward` of every rollout: `score` takes (verifier, response, answer) triples."""
    rollouts = [r for g in groups for r in g.rollouts]
    rewards = score([(r.prompt.task, r.completion.text, r.prompt.answer) for r in rollouts])
    for r, value in zip(rollouts, rewards, strict=True):
        r.reward = float(value)
