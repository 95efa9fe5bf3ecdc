"""Prompts -> rollout groups through any engine, and verification of the groups."""

from __future__ import annotations

from collections.abc import Callable

from spark_mcore.rollout.base import RolloutEngine, SamplingParams
from spark_mcore.types import Prompt, Rollout, RolloutGroup


def generate_groups(engine: RolloutEngine, prompts: list[Prompt], encode: Callable[[Prompt], list[int]],
                    params: SamplingParams) -> list[RolloutGroup]:
    """Samples `params.n` completions per prompt; each rollout carries the engine's policy version."""
    prompt_ids = [encode(p) for p in prompts]
    outputs = engine.generate(prompt_ids, params)
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
