"""String verifiers: `exact`, `choice` (multiple-choice letter) and `judge` (SPARK reward tasks).

All of them read only the final boxed answer (`extract_boxed`): a response without one scores
0, so the policy is rewarded for finishing with a box, as every SPARK template asks.
"""

from __future__ import annotations

import re

from spark_mcore.rewards.boxed import extract_boxed, normalize_plain, unwrap_text
from spark_mcore.rewards.registry import register_verifier

# A verdict or a choice letter is a few characters; anything much longer is prose, and skipping
# it keeps the regexes below cheap on adversarial input.
_MAX_SHORT_ANSWER_CHARS = 200
# `B`, `(B)`, `[B]`, `B.`, `B)`, `B:`, `B. 42`, `(B) 42`: the letter must stand alone, so
# `I think B` and `Because` are not letters.
_CHOICE = re.compile(r"[(\[]\s*([A-Za-z])\s*[)\]](?:\s.*)?|([A-Za-z])(?:[.:)](?:\s.*)?)?", re.DOTALL)
_JUDGE_LABELS = frozenset({"yes", "no", "a", "b"})
_EDGE_PUNCT = " \t\n.,;:!?\"'*`()[]"


def _boxed_short(response: object) -> str | None:
    boxed = extract_boxed(response)
    if boxed is None or len(boxed) > _MAX_SHORT_ANSWER_CHARS:
        return None
    return unwrap_text(boxed)


@register_verifier("exact")
def exact_verifier(response: str, answer: str) -> float:
    """1.0 when the final boxed answer equals `answer` up to whitespace and case, else 0.0.
    A response without a box scores 0 (the whole text is never compared)."""
    if not isinstance(answer, str):
        return 0.0
    boxed = extract_boxed(response)
    if boxed is None:
        return 0.0
    return float(normalize_plain(boxed.replace("$", "")) == normalize_plain(answer.replace("$", "")))


def choice_letter(text: str) -> str | None:
    """The single option letter in `text` (`"(b)."` -> `"B"`), or None when it is not one."""
    match = _CHOICE.fullmatch(unwrap_text(text).strip())
    if match is None:
        return None
    return (match.group(1) or match.group(2)).upper()


@register_verifier("choice")
def choice_verifier(response: str, answer: str) -> float:
    """1.0 when the boxed option letter (`B`, `(B)`, `B.`, `\\text{B}`, `b`) is the reference
    letter (given as `B` or `(B)`), else 0.0."""
    if not isinstance(answer, str) or len(answer) > _MAX_SHORT_ANSWER_CHARS:
        return 0.0
    boxed = _boxed_short(response)
    if boxed is None:
        return 0.0
    expected = choice_letter(answer)
    return float(expected is not None and choice_letter(boxed) == expected)


def judge_verdict(text: str) -> str:
    """Canonical verdict: `\\text{Yes}.` -> `yes`, `(A)` -> `a`; other text is casefolded as is."""
    return unwrap_text(text).strip(_EDGE_PUNCT).casefold()


@register_verifier("judge")
def judge_verifier(response: str, answer: str) -> float:
    """SPARK pointwise/pairwise judgement: 1.0 when the final boxed verdict (`Yes`/`No` for
    pointwise, `A`/`B` for pairwise; `\\boxed` or `\\box`, any case, `\\text{}` and trailing
    punctuation tolerated) equals the label, else 0.0. A label outside Yes/No/A/B scores 0."""
    if not isinstance(answer, str):
        return 0.0
    label = judge_verdict(answer)
    if label not in _JUDGE_LABELS:
        return 0.0
    boxed = _boxed_short(response)
    return float(boxed is not None and judge_verdict(boxed) == label)
