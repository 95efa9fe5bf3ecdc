"""Test-time self-reflection (SPARK): solve greedily, let the model judge its own answer,
and revise what it rejects, for up to `rounds` rounds, batched across prompts.

round r (1..rounds), for each prompt still open:
  judge its current response with a pointwise template -> verdict
  verdict "Yes"           -> the prompt is closed, its response kept
  "No" or unparsable      -> revise with a template that says the attempt is wrong; the
                             revision becomes the response (after the last round it is
                             accepted without another judgement)
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from spark_mcore.rollout.base import RolloutEngine, SamplingParams
from spark_mcore.spark.judging import (
    EncodeFn,
    JudgeFn,
    ScoreFn,
    default_judge,
    generate_texts,
    greedy_params,
    parse_verdict,
    user_prompt,
)
from spark_mcore.spark.templates import View, pick_template, render_pointwise, render_reflection
from spark_mcore.spark.text import question_text, show_response
from spark_mcore.types import Prompt

EMPTY_RESPONSE = "(no response)"


@dataclass
class SelfReflectResult:
    """Per prompt: `initial` and final `responses`, `verdicts` (one per judged round: "Yes",
    "No" or None = unparsable) and `rounds_used` (revisions made).

    With a score function: accuracy before/after and how often the judge rejected (said
    anything but Yes to) responses that were right / wrong, over all judgements made.
    """

    initial: list[str]
    responses: list[str]
    verdicts: list[list[str | None]]
    rounds_used: list[int]
    rounds_histogram: dict[int, int] = field(default_factory=dict)
    unparsable_rate: float = 0.0
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    reject_rate_on_right: float | None = None
    reject_rate_on_wrong: float | None = None

    def summary(self) -> dict[str, float]:
        """Scalars for logging (entries that are None are left out)."""
        out = {"self_reflect/unparsable_rate": self.unparsable_rate}
        for name in ("accuracy_before", "accuracy_after", "reject_rate_on_right", "reject_rate_on_wrong"):
            value = getattr(self, name)
            if value is not None:
                out[f"self_reflect/{name}"] = value
        for rounds, count in sorted(self.rounds_histogram.items()):
            out[f"self_reflect/rounds_{rounds}"] = float(count)
        return out


@dataclass
class _Loop:
    """What every round needs: the engine, its inputs and the greedy decoding settings."""

    engine: RolloutEngine
    encode: EncodeFn
    prompts: Sequence[Prompt]
    questions: list[str]
    params: SamplingParams
    judge: JudgeFn
    view: View
    batch_size: int

    def generate(self, prompts: Sequence[Prompt]) -> list[str]:
        return generate_texts(self.engine, self.encode, prompts, self.params, self.batch_size)


def self_reflect(
    engine: RolloutEngine,
    encode: EncodeFn,
    prompts: Sequence[Prompt],
    *,
    rounds: int = 2,
    params: SamplingParams | None = None,
    score: ScoreFn | None = None,
    judge: JudgeFn | None = None,
    view: View = "cot",
    seed: int = 0,
    batch_size: int = 0,
) -> SelfReflectResult:
    """Runs the loop above. `params` gives the budget and stop tokens (decoding is greedy);
    `judge` parses verdicts (default: the "judge" verifier); `score` (prompt, response) ->
    0/1 enables the accuracy and rejection statistics."""
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if view not in ("cot", "answer"):
        raise ValueError(f"view must be 'cot' or 'answer', got {view!r}")
    questions = [question_text(p) for p in prompts]
    loop = _Loop(
        engine, encode, prompts, questions, greedy_params(params), judge or default_judge(), view, batch_size
    )
    texts = loop.generate(prompts)
    initial = list(texts)
    verdicts: list[list[str | None]] = [[] for _ in prompts]
    used = [0] * len(prompts)
    judged: list[tuple[int, str, str | None]] = []  # (prompt index, response judged, verdict)
    open_ids = list(range(len(prompts)))
    for r in range(rounds):
        if not open_ids:
            break
        rngs = {i: random.Random(f"self-reflect:{seed}:{i}:{r}") for i in open_ids}
        rejected = _judge_round(loop, texts, open_ids, r, rngs, judged, verdicts)
        _revise(loop, texts, rejected, r, rngs)
        for i in rejected:
            used[i] += 1
        open_ids = rejected
    result = SelfReflectResult(initial, texts, verdicts, used, dict(sorted(Counter(used).items())))
    result.unparsable_rate = _rate([v is None for _, _, v in judged])
    if score is not None:
        _add_scores(result, prompts, judged, score)
    return result


def _judge_round(
    loop: _Loop,
    texts: list[str],
    open_ids: list[int],
    r: int,
    rngs: dict[int, random.Random],
    judged: list[tuple[int, str, str | None]],
    verdicts: list[list[str | None]],
) -> list[int]:
    """Asks the model to judge each open response; records the verdicts in `judged` and
    `verdicts`, returns the indices of the rejected responses."""
    judge_prompts = []
    for i in open_ids:
        template = pick_template("pointwise", rngs[i])
        text = render_pointwise(template, loop.questions[i], *_shown(texts[i], loop.view))
        judge_prompts.append(user_prompt(loop.prompts[i], f"judge{r}", text, "judge"))
    rejected = []
    for i, out in zip(open_ids, loop.generate(judge_prompts), strict=True):
        verdict = parse_verdict(out, ("Yes", "No"), loop.judge)
        judged.append((i, texts[i], verdict))
        verdicts[i].append(verdict)
        if verdict != "Yes":
            rejected.append(i)
    return rejected


def _revise(
    loop: _Loop, texts: list[str], rejected: list[int], r: int, rngs: dict[int, random.Random]
) -> None:
    """Replaces each rejected response by a revision made with a "this is wrong" prompt."""
    revise_prompts = []
    for i in rejected:
        template = pick_template("reflection", rngs[i], states_wrong=True)
        text = render_reflection(template, loop.questions[i], *_shown(texts[i], loop.view))
        src = loop.prompts[i]
        revise_prompts.append(user_prompt(src, f"revise{r}", text, src.task, src.answer))
    for i, text in zip(rejected, loop.generate(revise_prompts), strict=True):
        texts[i] = text


def _shown(text: str, view: View) -> tuple[str, View]:
    shown = show_response(text, view)
    return shown if shown is not None else (EMPTY_RESPONSE, "cot")


def _rate(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def _add_scores(
    result: SelfReflectResult,
    prompts: Sequence[Prompt],
    judged: list[tuple[int, str, str | None]],
    score: ScoreFn,
) -> None:
    memo: dict[tuple[int, str], bool] = {}

    def right(i: int, text: str) -> bool:
        if (i, text) not in memo:
            memo[(i, text)] = score(prompts[i], text) > 0.5
        return memo[(i, text)]

    n = len(prompts)
    result.accuracy_before = _rate([right(i, t) for i, t in enumerate(result.initial)]) if n else None
    result.accuracy_after = _rate([right(i, t) for i, t in enumerate(result.responses)]) if n else None
    on_right = [v != "Yes" for i, t, v in judged if right(i, t)]
    on_wrong = [v != "Yes" for i, t, v in judged if not right(i, t)]
    result.reject_rate_on_right = _rate(on_right) if on_right else None
    result.reject_rate_on_wrong = _rate(on_wrong) if on_wrong else None
