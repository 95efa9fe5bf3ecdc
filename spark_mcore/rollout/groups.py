"""Prompts -> rollout groups through any engine, and verification of the groups."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import replace

from spark_mcore.config.loader import ConfigError
from spark_mcore.models.vision import VisionInputs
from spark_mcore.rollout.base import RolloutEngine, SamplingParams
from spark_mcore.types import Completion, Prompt, Rollout, RolloutGroup


def engine_generate(engine: RolloutEngine, prompts: Sequence[Prompt], prompt_ids: list[list[int]],
                    encode: Callable[[Prompt], list[int]], params: SamplingParams) -> list[list[Completion]]:
    """`engine.generate` of the prompts' ids, with their images when `encode` is a vision-language
    encoder (data.vision_prompts.VisionPromptEncoder: it also has `images`): an engine with
    `takes_image_refs` (SGLang: it runs its own image processor) gets the prompts' image
    references as `image_data`, one with `takes_images` (transformers) the processed images."""
    images_of = getattr(encode, "images", None)
    if images_of is None or not any(p.images for p in prompts):
        return engine.generate(prompt_ids, params)
    check_engine_images(engine, prompts)
    if getattr(engine, "takes_image_refs", False):
        return engine.generate(prompt_ids, params, image_data=[list(p.images) for p in prompts])  # type: ignore[call-arg]
    images = [images_of(p) for p in prompts]
    vision = [None if i is None else VisionInputs(*i) for i in images]
    return engine.generate(prompt_ids, params, images=vision)  # type: ignore[call-arg]


def check_engine_images(engine: RolloutEngine, prompts: Sequence[Prompt]) -> None:
    """ConfigError when some prompt has images but the engine takes none (neither processed
    images, `takes_images`, nor image references, `takes_image_refs`)."""
    if getattr(engine, "takes_images", False) or getattr(engine, "takes_image_refs", False):
        return
    with_images = next((p for p in prompts if p.images), None)
    if with_images is not None:
        raise ConfigError(f"the rollout engine {type(engine).__name__} does not take images, but prompt "
                          f"{with_images.id!r} has {len(with_images.images)}. Fix: rollout.engine: hf "
                          "(transformers) or sglang for image prompts")


def response_seed(step_seed: int, prompt_id: str, sample_index: int) -> int:
    """The sampling seed of one response: a hash of (step seed, prompt id, sample index), in
    [0, 2**31) (SGLang's sampling_seed is an int)."""
    digest = hashlib.blake2b(f"{step_seed}:{prompt_id}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31)


def response_seeds(prompts: list[Prompt], n: int, step_seed: int) -> list[list[int]]:
    """Seeds [len(prompts)][n] of a step's responses. They depend on the prompt ids, not on
    positions, so any division of the prompts over ranks samples the same responses. A prompt
    id that occurs k times in the step takes sample indices k*n .. k*n + n - 1 at its k-th
    occurrence (more samples of it, never the same ones twice)."""
    seen: dict[str, int] = {}
    out = []
    for p in prompts:
        k = seen.get(p.id, 0)
        seen[p.id] = k + 1
        out.append([response_seed(step_seed, p.id, k * n + j) for j in range(n)])
    return out


def generate_groups(engine: RolloutEngine, prompts: list[Prompt], encode: Callable[[Prompt], list[int]],
                    params: SamplingParams) -> list[RolloutGroup]:
    """Samples `params.n` completions per prompt; each rollout carries the engine's policy
    version. Image prompts: see `engine_generate`. With `params.seed` and no `sample_seeds`,
    each response's seed comes from its prompt's id (`response_seeds`)."""
    if params.seed is not None and params.sample_seeds is None and params.temperature > 0:
        params = replace(params, sample_seeds=response_seeds(prompts, params.n, params.seed))
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
