"""Prompt wordings for the recycled reward tasks (our own phrasings).

Three kinds, each with ten phrasings; a seeded RNG picks one per sample:
  pointwise  — question + one candidate -> verdict `\\boxed{Yes}` / `\\boxed{No}`
  pairwise   — question + responses A and B -> `\\boxed{A}` / `\\boxed{B}`
  reflection — question + a previous attempt -> corrected solution, answer in `\\boxed{}`
Three reflection phrasings state outright that the attempt is wrong (`states_wrong`); the
test-time self-reflection loop uses only those.

Invariants: a template never receives the label, so the text cannot depend on it; every
judge template asks for `\\boxed{...}` (never `\\box{}`), naming both verdicts. Slots:
{question}, {noun} / {Noun} ("answer" when only the final answer is shown, "solution" for
the full response), {candidate}, {a}, {b}, {attempt}.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from spark_mcore.types import RewardKind

View = Literal["answer", "cot"]
NOUNS: dict[str, str] = {"answer": "answer", "cot": "solution"}


@dataclass(frozen=True)
class Template:
    id: str
    kind: RewardKind
    text: str
    states_wrong: bool = False


_POINTWISE = (
    "Problem:\n{question}\n\nProposed {noun}:\n{candidate}\n\nDecide whether the proposed {noun} is "
    "correct. End with \\boxed{{Yes}} if it is and \\boxed{{No}} if it is not.",
    "A student was given this question:\n{question}\n\nThe student's {noun}:\n{candidate}\n\nCheck "
    "the student's work. Is it right? Put your verdict in a box: \\boxed{{Yes}} or \\boxed{{No}}.",
    "You are grading. Question:\n{question}\n\nSubmitted {noun}:\n{candidate}\n\nVerify the "
    "submission and finish with exactly one of \\boxed{{Yes}} (correct) or \\boxed{{No}} (incorrect).",
    "{question}\n\nSomeone replied to the question above with this {noun}:\n{candidate}\n\nIs that "
    "correct? Reason briefly and conclude with \\boxed{{No}} or \\boxed{{Yes}}.",
    "Evaluate a {noun} to a problem.\n\nProblem: {question}\n\n{Noun}: {candidate}\n\nDoes it reach "
    "the correct result? Give your reasoning, then \\boxed{{Yes}} or \\boxed{{No}}.",
    "Task:\n{question}\n\nCandidate {noun}:\n{candidate}\n\nWork the task out yourself and compare. "
    "Final verdict, boxed: \\boxed{{Yes}} if the candidate is correct, otherwise \\boxed{{No}}.",
    "Consider this question and the {noun} below.\n\n[Question]\n{question}\n\n[{Noun}]\n{candidate}"
    "\n\nWould a careful checker accept this {noun}? Say \\boxed{{Yes}} or \\boxed{{No}} at the end.",
    "Check the following work.\nQuestion: {question}\n{Noun} given: {candidate}\nIf it is correct, "
    "finish with \\boxed{{Yes}}; if it has an error or a wrong result, finish with \\boxed{{No}}.",
    "Question:\n{question}\n\nHere is an attempted {noun}:\n{candidate}\n\nJudge its correctness. "
    "Your last line must be \\boxed{{No}} or \\boxed{{Yes}}.",
    "Read the problem and the {noun} that follows, then say whether the {noun} is correct.\n\n"
    "{question}\n\n---\n{candidate}\n---\n\nVerdict (\\boxed{{Yes}} or \\boxed{{No}}):",
)

_PAIRWISE = (
    "Question:\n{question}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\nWhich of the two responses is "
    "correct? Finish with \\boxed{{A}} or \\boxed{{B}}.",
    "Two {noun}s to the same problem are shown below.\n\nProblem: {question}\n\n[A]\n{a}\n\n[B]\n{b}"
    "\n\nWhich {noun} is correct? Give the letter in a box: \\boxed{{A}} or \\boxed{{B}}.",
    "Compare the two attempts.\n\nQuestion:\n{question}\n\nAttempt A:\n{a}\n\nAttempt B:\n{b}\n\n"
    "Which attempt is better? Explain briefly, then answer \\boxed{{A}} or \\boxed{{B}}.",
    "{question}\n\nTwo candidates replied to the question above.\nCandidate A: {a}\nCandidate B: {b}"
    "\n\nPick the candidate that is right and end with \\boxed{{A}} or \\boxed{{B}}.",
    "You are comparing {noun}s. Problem:\n{question}\n\nFirst {noun} (A):\n{a}\n\nSecond {noun} "
    "(B):\n{b}\n\nDecide which {noun} reaches the correct result. Final choice: \\boxed{{A}} or "
    "\\boxed{{B}}.",
    "Problem statement:\n{question}\n\nOption A:\n{a}\n\nOption B:\n{b}\n\nCheck both options. "
    "Which one would you trust? Box the letter: \\boxed{{B}} or \\boxed{{A}}.",
    "Below are responses A and B to one question.\n\nQuestion: {question}\n\nA: {a}\n\nB: {b}\n\n"
    "Which one gets it right? Conclude with \\boxed{{A}} or \\boxed{{B}}.",
    "Act as a judge between two {noun}s.\n\n<question>\n{question}\n</question>\n<A>\n{a}\n</A>\n"
    "<B>\n{b}\n</B>\n\nState which is better as \\boxed{{A}} or \\boxed{{B}}.",
    "Here is a question followed by two {noun}s.\n\n{question}\n\n(A) {a}\n\n(B) {b}\n\nVerify each "
    "and report the better one as \\boxed{{B}} or \\boxed{{A}}.",
    "Question:\n{question}\n\n--- Response A ---\n{a}\n--- Response B ---\n{b}\n\nWhich response "
    "should be preferred? Your final line: \\boxed{{A}} or \\boxed{{B}}.",
)

_REFLECTION_NEUTRAL = (
    "Problem:\n{question}\n\nA previous attempt gave this {noun}:\n{attempt}\n\nReview the attempt. "
    "If it has a mistake, fix it; either way, give a full solution with the final answer in \\boxed{{}}.",
    "{question}\n\nHere is an earlier try at the problem above:\n{attempt}\n\nCheck it step by step "
    "and write a corrected solution. Box the final answer with \\boxed{{}}.",
    "Question:\n{question}\n\nDraft {noun}:\n{attempt}\n\nVerify the draft, then solve the problem "
    "carefully yourself and give the final answer in \\boxed{{}}.",
    "Someone attempted this problem.\n\nProblem: {question}\n\nTheir {noun}: {attempt}\n\nIs anything "
    "wrong? Work through the problem again and finish with the correct answer inside \\boxed{{}}.",
    "Problem:\n{question}\n\nPrevious {noun}:\n{attempt}\n\nRe-examine the reasoning and the result, "
    "correct any errors, and state the final answer in \\boxed{{}}.",
    "{question}\n\nProposed {noun}:\n{attempt}\n\nDouble-check the proposal and produce a solution "
    "you are confident in. The final answer goes in \\boxed{{}}.",
    "Look over this attempt before answering.\n\n[Problem]\n{question}\n\n[Attempt]\n{attempt}\n\n"
    "Find and repair any mistakes, then give the final answer in \\boxed{{}}.",
)

_REFLECTION_WRONG = (
    "Problem:\n{question}\n\nThe following {noun} is incorrect:\n{attempt}\n\nFind the error and solve "
    "the problem again. Put the final answer in \\boxed{{}}.",
    "{question}\n\nThis attempt reaches the wrong result:\n{attempt}\n\nSolve the problem again, "
    "correctly this time, and box the final answer with \\boxed{{}}.",
    "Question:\n{question}\n\nA wrong {noun} was given:\n{attempt}\n\nExplain what went wrong and give "
    "the right solution, ending with the answer in \\boxed{{}}.",
)


def _make(
    kind: RewardKind, texts: tuple[str, ...], start: int = 0, states_wrong: bool = False
) -> tuple[Template, ...]:
    return tuple(
        Template(f"{kind}-{start + i:02d}", kind, text, states_wrong) for i, text in enumerate(texts)
    )


# The registry: kind -> phrasings. Ids are stable (they are recorded in sample metadata).
TEMPLATES: dict[str, tuple[Template, ...]] = {
    "pointwise": _make("pointwise", _POINTWISE),
    "pairwise": _make("pairwise", _PAIRWISE),
    "reflection": _make("reflection", _REFLECTION_NEUTRAL)
    + _make("reflection", _REFLECTION_WRONG, start=len(_REFLECTION_NEUTRAL), states_wrong=True),
}
_BY_ID: dict[str, Template] = {t.id: t for ts in TEMPLATES.values() for t in ts}


def get_template(template_id: str) -> Template:
    if template_id not in _BY_ID:
        raise KeyError(f"template id '{template_id}' is unknown; known ids look like {sorted(_BY_ID)[:3]}")
    return _BY_ID[template_id]


def pick_template(kind: str, rng: random.Random, states_wrong: bool | None = None) -> Template:
    """A seeded choice among the phrasings of `kind` (None = any; True/False = only those that
    do / do not say the attempt is wrong)."""
    if kind not in TEMPLATES:
        raise KeyError(f"template kind '{kind}' is unknown; choose one of {sorted(TEMPLATES)}")
    pool = [t for t in TEMPLATES[kind] if states_wrong is None or t.states_wrong == states_wrong]
    if not pool:
        raise ValueError(f"no '{kind}' template with states_wrong={states_wrong}")
    return pool[rng.randrange(len(pool))]


def _fill(template: Template, kind: str, view: View, **slots: str) -> str:
    if template.kind != kind:
        raise ValueError(f"template '{template.id}' is a {template.kind} template, not {kind}")
    if view not in NOUNS:
        raise ValueError(f"view must be one of {sorted(NOUNS)}, got {view!r}")
    noun = NOUNS[view]
    return template.text.format(noun=noun, Noun=noun.capitalize(), **slots)


def render_pointwise(template: Template, question: str, candidate: str, view: View) -> str:
    return _fill(template, "pointwise", view, question=question, candidate=candidate)


def render_pairwise(template: Template, question: str, a: str, b: str, view: View) -> str:
    return _fill(template, "pairwise", view, question=question, a=a, b=b)


def render_reflection(template: Template, question: str, attempt: str, view: View) -> str:
    return _fill(template, "reflection", view, question=question, attempt=attempt)


def corpus_texts() -> list[str]:
    """Every phrasing in both views with empty slots: extra corpus for training a small
    tokenizer (the built-in one) so that the task wording tokenizes compactly."""
    slots = {"question": "", "candidate": "", "a": "", "b": "", "attempt": ""}
    return [
        t.text.format(noun=noun, Noun=noun.capitalize(), **slots)
        for ts in TEMPLATES.values()
        for t in ts
        for noun in NOUNS.values()
    ]
