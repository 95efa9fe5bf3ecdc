"""Running the model as a judge through the engine protocol (shared by self-reflection and
the reward benchmark): batched greedy generation and verdict parsing."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from spark_mcore.rollout.base import RolloutEngine, SamplingParams
from spark_mcore.rollout.groups import engine_generate
from spark_mcore.types import Prompt

# (response text, label) -> score in [0, 1]; the "judge" verifier of spark_mcore.rewards.
JudgeFn = Callable[[str, str], float]
# (prompt, response text) -> score in [0, 1]; e.g. the prompt's own verifier.
ScoreFn = Callable[[Prompt, str], float]
EncodeFn = Callable[[Prompt], list[int]]


def default_judge() -> JudgeFn:
    """The registered "judge" verifier, so verdicts here are parsed exactly as in training."""
    from spark_mcore.rewards import get_verifier  # lazy: only evaluation needs the verifiers

    return get_verifier("judge")


def verifier_score(prompt: Prompt, response: str) -> float:
    """Scores a response with the verifier its prompt names (`prompt.task`)."""
    from spark_mcore.rewards import get_verifier

    return float(get_verifier(prompt.task)(response, prompt.answer))


def parse_verdict(text: str, choices: Sequence[str], judge: JudgeFn) -> str | None:
    """The first of `choices` the judge verifier accepts for `text`, None if none (unparsable)."""
    for choice in choices:
        if judge(text, choice) > 0.5:
            return choice
    return None


def greedy_params(base: SamplingParams | None, max_new_tokens: int | None = None) -> SamplingParams:
    """One greedy sample per prompt, keeping the stop tokens (and budget) of `base`."""
    params = dataclasses.replace(base or SamplingParams(), n=1, temperature=0.0)
    if max_new_tokens is not None:
        params = dataclasses.replace(params, max_new_tokens=max_new_tokens)
    return params


def generate_texts(
    engine: RolloutEngine,
    encode: EncodeFn,
    prompts: Sequence[Prompt],
    params: SamplingParams,
    batch_size: int = 0,
) -> list[str]:
    """The first completion's text for each prompt, generated `batch_size` prompts per call
    (0 = all in one call)."""
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0 (0 = one call), got {batch_size}")
    texts: list[str] = []
    step = batch_size or max(1, len(prompts))
    for start in range(0, len(prompts), step):
        chunk = prompts[start : start + step]
        outs = engine_generate(engine, chunk, [encode(p) for p in chunk], encode, params)
        if len(outs) != len(chunk) or any(len(o) < 1 for o in outs):
            raise RuntimeError(
                f"rollout engine returned {len(outs)} completion lists for {len(chunk)} prompts "
                "(expected one non-empty list per prompt); check the engine's generate()"
            )
        texts += [o[0].text for o in outs]
    return texts


def user_prompt(source: Prompt, suffix: str, text: str, task: str, answer: str = "") -> Prompt:
    """A one-turn prompt derived from `source` (same images), id `<source id>#<suffix>`."""
    return Prompt(
        id=f"{source.id}#{suffix}",
        messages=[{"role": "user", "content": text}],
        answer=answer,
        task=task,
        images=list(source.images),
    )
