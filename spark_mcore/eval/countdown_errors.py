"""Why a countdown answer is wrong, and where a written judge check goes wrong (issue 15).

Two pure classifiers for the diagnosis of round seven (`tools/diagnose_countdown.py`):

`answer_error(response, answer)` -> the cause of a policy answer, first match in this order:
  "right"           the verifier says 1.0 (whatever its steps say);
  "unparseable"     no box, or a box the verifier's tokenizer/parser refuses;
  "foreign_number"  the box uses a number that is not given, or a given one too often;
  "false_step"      a written step `a op b = c` is arithmetically false (`8-5=2`);
  "box_mismatch"    the steps are true but the box's value is not the last step's value;
  "misses_target"   true steps, the box follows them, and its value is not the target
                    (a search error: the only kind a check can catch while solving cannot).

`check_error(written, reference)` -> the first component of a written check (the judge's
text before its verdict box) that differs from the reference check (`countdown_trace`):
  "steps"    the recomputed arithmetic of the box (`9-4=5.`);
  "numbers"  `uses ...; given ...` and the broken-rule sentences (`4 not given.`);
  "compare"  `v vs T: ..., same|differ.`;
  "none"     every component as in the reference.
`copy_verdict(response, answer)`: the verdict of a judge that trusts the response's own last
step (Yes when it claims the target); it is right on true steps and wrong on false ones.
`verdict_follows(written, verdict)`: whether a verdict agrees with the check's own last
comparison (`same` -> Yes), i.e. the verdict is right GIVEN the check the judge wrote.
"""

from __future__ import annotations

import re
from fractions import Fraction

from spark_mcore.rewards.boxed import extract_boxed
from spark_mcore.rewards.countdown import _Reject, countdown_verifier, evaluate, parse_answer, tokenize
from spark_mcore.rewards.judge_check import check_steps_of

ANSWER_KINDS = ("right", "unparseable", "foreign_number", "false_step", "box_mismatch", "misses_target")
CHECK_PARTS = ("steps", "numbers", "compare")
_STEP = re.compile(r"(\d+)\s*([-+*/])\s*(\d+)\s*=\s*(-?\d+)")
# `v vs T: same.` (rounds 1-8) or `v vs T: 2 vs 1, differ.` (digit-wise, countdown_trace.compare_text)
_COMPARE = re.compile(r"vs\s+-?\d+\s*:[^.\\]*?\b(same|differ)\b")


def written_steps(text: str) -> list[tuple[int, str, int, int]]:
    """Every `a op b = c` the text writes (before its box), as (a, op, b, c)."""
    box = text.find("\\box")
    body = text if box < 0 else text[:box]
    return [(int(a), op, int(b), int(c)) for a, op, b, c in _STEP.findall(body)]


def step_true(a: int, op: str, b: int, c: int) -> bool:
    """Whether `a op b = c` holds exactly (a division by zero is false)."""
    if op == "/":
        return b != 0 and Fraction(a, b) == c
    return {"+": a + b, "-": a - b, "*": a * b}[op] == c


def answer_error(response: str, answer: str) -> str:
    """The cause of a countdown answer's verdict (see the module docstring)."""
    if countdown_verifier(response, answer) == 1.0:
        return "right"
    ref = parse_answer(answer)
    expr = extract_boxed(response) if isinstance(response, str) else None
    if ref is None or expr is None:
        return "unparseable"
    numbers, target = ref
    try:
        literals = [int(t) for t in tokenize(expr) if t.isdigit()]
    except _Reject:
        return "unparseable"
    left = list(numbers)
    for n in literals:
        if n not in left:
            return "foreign_number"
        left.remove(n)
    try:
        value = evaluate(expr, numbers)
    except _Reject:
        return "unparseable"
    steps = written_steps(response)
    if any(not step_true(*s) for s in steps):
        return "false_step"
    if steps and Fraction(steps[-1][3]) != value:
        return "box_mismatch"
    return "misses_target" if value != target else "right"


def copy_verdict(response: str, answer: str) -> str:
    """What a judge that TRUSTS the response's written steps says: "Yes" when its last written
    step's value is the target (no steps: the box's value, as the verifier reads it)."""
    ref = parse_answer(answer)
    if ref is None:
        return "No"
    steps = written_steps(response)
    if steps:
        return "Yes" if steps[-1][3] == ref[1] else "No"
    return "Yes" if countdown_verifier(response, answer) == 1.0 else "No"


def _part(sentence: str) -> str:
    if " vs " in sentence or sentence.startswith("vs "):
        return "compare"
    if sentence.startswith("uses") or "not given" in sentence or " used " in sentence:
        return "numbers"
    return "steps"


def split_check(text: str) -> dict[str, list[str]]:
    """The sentences of a check grouped by component (a verdict box, if any, is dropped)."""
    box = text.find("\\box")
    out: dict[str, list[str]] = {p: [] for p in CHECK_PARTS}
    for s in check_steps_of(text if box < 0 else text[:box]):
        out[_part(s)].append(s)
    return out


def check_error(written: str, reference: str) -> str:
    """The first component (steps, numbers, compare) where `written` differs from `reference`,
    "none" when all agree."""
    w, r = split_check(written), split_check(reference)
    for part in CHECK_PARTS:
        if w[part] != r[part]:
            return part
    return "none"


def verdict_follows(written: str, verdict: str | None) -> bool | None:
    """Whether a pointwise verdict agrees with the written check's last `vs` comparison and
    its broken rules (`same` and no rule broken -> Yes); None when the check has no comparison."""
    found = _COMPARE.findall(written)
    if not found or verdict is None:
        return None
    broken = bool(split_check(written)["numbers"][1:])
    expected = "yes" if found[-1] == "same" and not broken else "no"
    return verdict.lower() == expected


__all__ = ["ANSWER_KINDS", "CHECK_PARTS", "answer_error", "copy_verdict", "check_error", "split_check", "step_true",
           "verdict_follows", "written_steps"]
