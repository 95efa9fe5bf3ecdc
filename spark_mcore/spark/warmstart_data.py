"""SPARK-format SFT examples for the warm start of a model trained from scratch.

A pretrained model can already follow judge prompts a little; the tiny demo model has never
seen one, so every recycled reward task would score 0 and GRPO would learn nothing from them.
This module builds a small supply of reward tasks with known answers from the builtin arith
prompts (and countdown ones, with that task's own wrong-solution kinds from
`spark_mcore.data.countdown`), rendered with the SAME templates and response views as the recycler:

  pointwise  — one candidate (right or wrong)       -> "\\boxed{Yes}" / "\\boxed{No}"
  pairwise   — one right and one wrong, shuffled     -> "\\boxed{A}" / "\\boxed{B}"
  reflection — one wrong attempt                     -> the correct worked solution

Judge targets are the bare verdict: a one-line justification ("37+45=82.") was tried and a
tiny model trained from scratch could not copy the expression out of a long judge prompt, so
the justification took the loss and the verdict stayed unparsable. A bare verdict teaches the
format (which verdicts a prompt asks for) quickly while judging itself stays weak, leaving
room for RL on the judge tasks. Wrong candidates are the
worked solution with one error, from a registry of error kinds (`ERRORS`):
  final   — the steps are right, the boxed answer is off by 1, 2 or 10;
  step    — the last step's result is off by one and the box follows it consistently;
  operand — an operand is misread (one more or one less) and the whole solution follows it.

Invariants (tested): labels are balanced per kind (slot i of a kind gets label
LABELS[kind][(i // len(kinds)) % 2]); a task's template and view are drawn from an RNG seeded
by (seed, slot) before the label is used, so the prompt depends on the label only through the
candidate texts; the label never appears in the prompt text except where the template names
both verdicts.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from spark_mcore.data import countdown
from spark_mcore.data.worked import right_solution, wrong_solution
from spark_mcore.spark.templates import (
    Template,
    View,
    pick_template,
    render_pairwise,
    render_pointwise,
    render_reflection,
)
from spark_mcore.spark.text import question_text, show_response
from spark_mcore.types import JUDGE_TASK, KIND_KEY, REWARD_KINDS, Prompt

KINDS: tuple[str, ...] = REWARD_KINDS
LABELS: dict[str, tuple[str, str]] = {"pointwise": ("Yes", "No"), "pairwise": ("A", "B")}


# ---------------------------------------------------------------- tasks
@dataclass(frozen=True)
class _Draws:
    """Everything about a task that is drawn before its label is looked at."""

    template: Template
    view: View
    wrong: str  # a wrong worked solution's text
    error: str


def _expr(prompt: Prompt) -> str:
    expr = prompt.meta.get("expr")
    if not isinstance(expr, str):
        raise ValueError(
            f"prompt {prompt.id!r} has no meta['expr']: judge warm-start data needs builtin arith "
            "or countdown prompts (data.source: builtin:arith) or warmstart.judge_fraction: 0"
        )
    return expr


def _right_text(prompt: Prompt) -> str:
    """The correct worked solution shown to a judge (arith, or countdown by meta["source"])."""
    if prompt.meta.get("source") == countdown.SOURCE:
        return countdown.right_solution(prompt)
    return right_solution(_expr(prompt)).text


def _wrong_text(prompt: Prompt, rng: random.Random) -> tuple[str, str]:
    """(a wrong worked solution's text, its error kind) for an arith or countdown prompt."""
    if prompt.meta.get("source") == countdown.SOURCE:
        return countdown.wrong_solution(prompt, rng)
    worked, kind = wrong_solution(_expr(prompt), rng)
    return worked.text, kind


def _shown(text: str, view: View) -> tuple[str, View]:
    shown = show_response(text, view)
    assert shown is not None  # worked solutions are never empty
    return shown


def _pointwise(prompt: Prompt, d: _Draws, label: str) -> tuple[str, str, list[str]]:
    candidate = _right_text(prompt) if label == "Yes" else d.wrong
    text = render_pointwise(d.template, question_text(prompt), *_shown(candidate, d.view))
    return text, f"\\boxed{{{label}}}", [candidate]


def _pairwise(prompt: Prompt, d: _Draws, label: str) -> tuple[str, str, list[str]]:
    right = _right_text(prompt)
    (g, gv), (b, bv) = _shown(right, d.view), _shown(d.wrong, d.view)
    if gv != bv:  # both in one view, as the recycler shows pairs
        (g, gv), (b, bv) = _shown(right, "cot"), _shown(d.wrong, "cot")
    a_text, b_text = (g, b) if label == "A" else (b, g)
    text = render_pairwise(d.template, question_text(prompt), a_text, b_text, gv)
    order = [right, d.wrong] if label == "A" else [d.wrong, right]
    return text, f"\\boxed{{{label}}}", order


def _reflection(prompt: Prompt, d: _Draws, label: str) -> tuple[str, str, list[str]]:
    text = render_reflection(d.template, question_text(prompt), *_shown(d.wrong, d.view))
    return text, _right_text(prompt), [d.wrong]


# kind -> (prompt, draws, label) -> (task prompt text, SFT target, full candidate texts in shown order)
_BUILDERS: dict[str, Callable[[Prompt, _Draws, str], tuple[str, str, list[str]]]] = {
    "pointwise": _pointwise,
    "pairwise": _pairwise,
    "reflection": _reflection,
}


def build_task(prompt: Prompt, kind: str, label: str, rng: random.Random) -> tuple[Prompt, str]:
    """One SPARK-format task from a builtin `prompt` (arith or countdown) and its SFT target.
    `label` is "Yes"/"No" (pointwise), "A"/"B" (pairwise, the position of the right solution)
    or the source answer (reflection). The draws from `rng` do not depend on `label`."""
    if kind not in _BUILDERS:
        raise ValueError(f"warm-start task kind '{kind}' is unknown; choose from {sorted(_BUILDERS)}")
    if kind in LABELS and label not in LABELS[kind]:
        raise ValueError(f"{kind} label must be one of {LABELS[kind]}, got {label!r}")
    template = pick_template(kind, rng)
    view: View = "cot" if rng.random() < 0.5 else "answer"
    wrong, error = _wrong_text(prompt, rng)
    text, target, candidates = _BUILDERS[kind](prompt, _Draws(template, view, wrong, error), label)
    task = Prompt(
        id=f"{prompt.id}#warm-{kind}",
        messages=[{"role": "user", "content": text}],
        answer=label if kind in LABELS else prompt.answer,
        task=JUDGE_TASK if kind in LABELS else prompt.task,
        images=list(prompt.images),
        meta={KIND_KEY: kind, "template_id": template.id, "view": view, "error": error,
              "source_prompt_id": prompt.id, "candidates": candidates},
    )
    return task, target


def judge_sft_examples(
    prompts: Sequence[Prompt], count: int, seed: int, kinds: Sequence[str] = KINDS
) -> list[tuple[Prompt, str]]:
    """`count` (task prompt, target) pairs: slot i has kind kinds[i % len(kinds)], its label
    alternates per kind (balanced), and its source is a seeded permutation of `prompts`."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if count and not prompts:
        raise ValueError("judge_sft_examples needs source prompts; data.source gave none")
    unknown = [k for k in kinds if k not in _BUILDERS]
    if not kinds or unknown:
        raise ValueError(f"kinds must be a non-empty subset of {sorted(_BUILDERS)}, got {list(kinds)}")
    order = list(range(len(prompts)))
    random.Random(f"warm-judge:{seed}:order").shuffle(order)
    out = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        source = prompts[order[i % len(order)]]
        label = LABELS[kind][(i // len(kinds)) % 2] if kind in LABELS else source.answer
        out.append(build_task(source, kind, label, random.Random(f"warm-judge:{seed}:{i}")))
    return out


__all__ = ["KINDS", "LABELS", "build_task", "judge_sft_examples"]
