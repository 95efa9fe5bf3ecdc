"""A written check of a countdown response: the judge target that shows its work.

    check_trace("9-4=5. 5*5=25. \\boxed{(9-4)*5}", '{"numbers": [9, 4, 5], "target": 25}')
    -> "9-4=5. 5*5=25. uses 9 4 5; given 9 4 5. 25 vs 25: 2 vs 2, 5 vs 5, same. \\boxed{Yes}"

A judge that must answer `\\boxed{Yes}` / `\\boxed{No}` at once has to evaluate the boxed
expression, match its numbers against the given ones and compare the value with the target
inside one forward pass; a tiny model cannot. Written out, each of those is one easy step, in
the step format the policy already writes (`a op b = value.`):

  1. the last boxed expression evaluated operation by operation in evaluation order
     (left to right, parentheses first; values exact, a fraction written `7/2`);
  2. `uses <literals>; given <numbers>.` and each broken rule: `4 not given.`,
     `7 used twice.` (or `used 3 times.`);
  3. `v vs T: ...` then `same.` when the value equals the target, else `differ.`, the
     decision taken digit by digit (`compare_text`): `27 vs 18: 2 vs 1, differ.`,
     `18 vs 18: 1 vs 1, 8 vs 8, same.`, so each decision rests on two adjacent digit tokens
     (issue 15, ninth round: with the whole-number format `27 vs 18: same.` the warm start
     copied the response's claim and wrote `same` on 47 % of its wrong No-row checks). A value
     that is not a whole number, is negative or has another digit count than the target says
     so instead (`7/2 vs 18: not whole, differ.`, `-3 vs 18: negative, differ.`,
     `127 vs 18: 3 digits vs 2, differ.`). Earlier formats: `v=T.` / `v is not T.` made the
     model pick `=` before it had copied the target (`24=14.`);
  4. `\\boxed{Yes}` iff no rule is broken and v = T, else `\\boxed{No}`.

A missing box, an unreadable box (unknown symbol, unbalanced parenthesis, too long), more
literals than given numbers, division by zero and a malformed reference each give a short
trace ending `\\boxed{No}`. The verdict always equals `countdown_verifier` (same tokenizer,
parser and caps, `spark_mcore.rewards.countdown`), and the work is bounded the same way.
"""

from __future__ import annotations

import re
from collections import Counter
from fractions import Fraction

from spark_mcore.rewards.boxed import extract_boxed
from spark_mcore.rewards.countdown import _Parser, _Reject, parse_answer, tokenize
from spark_mcore.rewards.judge_check import register_check_writer

YES, NO = "\\boxed{Yes}", "\\boxed{No}"


def _num(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


class _StepParser(_Parser):
    """The verifier's parser, writing each operation as a step (`7*3=21.`)."""

    def __init__(self, tokens: list[str]) -> None:
        super().__init__(tokens)
        self.steps: list[str] = []

    def _apply(self, op: str, lhs: Fraction, rhs: Fraction) -> Fraction:
        if op == "/" and rhs == 0:
            self.steps.append(f"{_num(lhs)}/0 divides by zero.")
        value = super()._apply(op, lhs, rhs)
        self.steps.append(f"{_num(lhs)}{op}{_num(rhs)}={_num(value)}.")
        return value


def compare_text(value: Fraction, target: int) -> str:
    """`v vs T: <digit-wise comparison>, same.|differ.` (see the module docstring, point 3)."""
    head = f"{_num(value)} vs {target}:"
    if value.denominator != 1:
        return f"{head} not whole, differ."
    if value < 0:
        return f"{head} negative, differ."
    v, t = str(value.numerator), str(target)
    if len(v) != len(t):
        return f"{head} {len(v)} digits vs {len(t)}, differ."
    pairs = []
    for a, b in zip(v, t, strict=True):
        pairs.append(f"{a} vs {b}")
        if a != b:
            return f"{head} {', '.join(pairs)}, differ."
    return f"{head} {', '.join(pairs)}, same."


_OLD_COMPARE = re.compile(r"(-?\d+(?:/\d+)?) vs (\d+): (?:same|differ)\.")


def upgrade_check(text: str) -> str:
    """A check written in the eighth round's format (`27 vs 18: differ.`) with its comparison
    in today's (`compare_text`); text already in today's format, or without one, is unchanged.
    Used to reuse own-judge rows (`warmstart.judge_file`) built before the format changed."""
    return _OLD_COMPARE.sub(lambda m: compare_text(Fraction(m.group(1)), int(m.group(2))), text)


def _number_problems(used: list[int], given: list[int]) -> list[str]:
    """`4 not given.` / `7 used twice.` for each literal beyond the given multiset."""
    have, counts = Counter(given), Counter(used)
    problems = []
    for n in sorted(counts - have, key=used.index):  # in order of first use
        if not have[n]:
            problems.append(f"{n} not given.")
        else:
            problems.append(f"{n} used {'twice' if counts[n] == 2 else f'{counts[n]} times'}.")
    return problems


@register_check_writer("countdown")  # the reference check of recycled judge tasks (spark.judge_check)
def check_steps(response: str, answer: str) -> tuple[str, bool]:
    """(the written check without its verdict box, the verdict); see the module docstring."""
    ref = parse_answer(answer)
    if ref is None:
        return "no problem to check.", False
    numbers, target = ref
    expr = extract_boxed(response) if isinstance(response, str) else None
    if expr is None:
        return "no box.", False
    try:
        tokens = tokenize(expr)
    except _Reject:
        return "cannot read the box.", False
    literals = sum(t.isdigit() for t in tokens)
    if literals > len(numbers):  # the verifier refuses before any arithmetic; so do we
        return f"uses {literals} numbers; given {len(numbers)}.", False
    parser = _StepParser(tokens)
    try:
        value = parser.parse()
    except _Reject as e:
        tail = "" if "division by zero" in str(e) else "cannot read the box."
        return " ".join([*parser.steps, tail]).strip(), False
    parts = [*parser.steps, f"uses {' '.join(map(str, parser.literals))}; given {' '.join(map(str, numbers))}."]
    problems = _number_problems(parser.literals, numbers)
    ok = value == target
    parts += problems + [compare_text(value, target)]
    return " ".join(parts), ok and not problems


def check_trace(response: str, answer: str) -> str:
    """The written check of `response` against `answer` ending `\\boxed{Yes}` or `\\boxed{No}`;
    the verdict equals `countdown_verifier(response, answer)`. Never raises on strings."""
    body, ok = check_steps(response, answer)
    return f"{body} {YES if ok else NO}"


def pairwise_trace(first: str, second: str, answer: str) -> str:
    """Both responses checked (`A: <check> B: <check>`), then `\\boxed{B}` when only the second
    is right, else `\\boxed{A}` (pairwise judge rows always hold exactly one right response)."""
    body_a, ok_a = check_steps(first, answer)
    body_b, ok_b = check_steps(second, answer)
    return f"A: {body_a} B: {body_b} \\boxed{{{'B' if ok_b and not ok_a else 'A'}}}"


__all__ = ["check_steps", "check_trace", "compare_text", "pairwise_trace", "upgrade_check"]
