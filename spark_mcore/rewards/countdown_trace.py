"""A written check of a countdown response: the judge target that shows its work.

    check_trace("9-4=5. 5*5=25. \\boxed{(9-4)*5}", '{"numbers": [9, 4, 5], "target": 25}')
    -> "9-4=5. 5*5=25. uses 9 4 5; given 9 4 5. 25 vs 25: same. \\boxed{Yes}"

A judge that must answer `\\boxed{Yes}` / `\\boxed{No}` at once has to evaluate the boxed
expression, match its numbers against the given ones and compare the value with the target
inside one forward pass; a tiny model cannot. Written out, each of those is one easy step, in
the step format the policy already writes (`a op b = value.`):

  1. the last boxed expression evaluated operation by operation in evaluation order
     (left to right, parentheses first; values exact, a fraction written `7/2`);
  2. `uses <literals>; given <numbers>.` and each broken rule: `4 not given.`,
     `7 used twice.` (or `used 3 times.`);
  3. `v vs T: same.` when the value equals the target, else `v vs T: differ.` (the decision
     is written after both numbers: a first format, `v=T.` / `v is not T.`, made the model pick
     `=` before it had copied the target, and it wrote `24=14.`);
  4. `\\boxed{Yes}` iff no rule is broken and v = T, else `\\boxed{No}`.

A missing box, an unreadable box (unknown symbol, unbalanced parenthesis, too long), more
literals than given numbers, division by zero and a malformed reference each give a short
trace ending `\\boxed{No}`. The verdict always equals `countdown_verifier` (same tokenizer,
parser and caps, `spark_mcore.rewards.countdown`), and the work is bounded the same way.
"""

from __future__ import annotations

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
    parts += problems + [f"{_num(value)} vs {target}: {'same' if ok else 'differ'}."]
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


__all__ = ["check_steps", "check_trace", "pairwise_trace"]
