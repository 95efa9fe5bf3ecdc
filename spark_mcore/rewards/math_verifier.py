"""The `math` verifier: final boxed answer vs a bare reference, via math-verify (sympy).

Order of checks, cheapest first:
1. no final box -> 0;
2. normalised string match (`normalize_math`) -> 1;
3. answers longer than `MAX_SYMPY_CHARS` -> 0 (sympy time grows steeply with length);
4. math-verify `parse` of both sides; expressions that would make sympy build astronomically
   large integers -> 0 (see `magnitude_ok`);
5. math-verify `verify(gold, pred)`.

math-verify's own timeouts are turned off (`parsing_timeout=None`, `timeout_seconds=None`): they
call `signal.alarm`, which raises outside the main thread and would cancel the outer timer that
`spark_mcore.rewards.timeout.time_limit` sets. The caller (`run_check` / `VerifierPool`) bounds
the time instead.

Known gap: a few LaTeX constructs are evaluated while parsing (e.g. `\\binom{10^{10^{10}}}{2}`),
in one uninterruptible C call. In-process (num_workers=0) such a check blocks until it ends;
the worker pool kills it at the timeout.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import sympy
from math_verify import parse, verify

from spark_mcore.rewards.boxed import extract_boxed, normalize_math
from spark_mcore.rewards.registry import register_verifier

# Real final answers are far shorter; longer ones are usually degenerate generations.
MAX_SYMPY_CHARS = 1000
# Any integer sympy may need to materialise must have fewer decimal digits than this. A
# 10^4-digit integer costs microseconds; `9^{9^{9}}` (3.7e8 digits) costs minutes of
# uninterruptible C time and gigabytes.
MAX_DIGITS = 10_000.0
_LOG10_2 = math.log10(2)
# Functions whose value has about n*log10(n) digits for argument n.
_FACTORIAL_LIKE = (
    sympy.factorial,
    sympy.factorial2,
    sympy.subfactorial,
    sympy.gamma,
    sympy.binomial,
    sympy.RisingFactorial,
    sympy.FallingFactorial,
)


class _DropDisabledTimeoutWarning(logging.Filter):
    """math-verify warns once that its timeout is off: intended here (see module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropDisabledTimeoutWarning())


def _digits_bound(expr: Any) -> float:
    """Upper bound of log10 |n| (about the decimal digits) over the integers n that evaluating
    `expr` exactly may build. Exact for integers; +1 per sum and sum-of-logs per product."""
    if isinstance(expr, sympy.MatrixBase):
        return max((_digits_bound(e) for e in expr), default=0.0)
    if not isinstance(expr, sympy.Basic):
        return 0.0
    if isinstance(expr, sympy.Rational):
        return math.log10(max(abs(int(expr.p)), int(expr.q), 1))
    if isinstance(expr, sympy.Float):
        _sign, _mantissa, exponent, bits = expr._mpf_
        return (abs(exponent) + abs(bits)) * _LOG10_2  # an exact Rational needs this many
    if isinstance(expr, sympy.Symbol):
        return 1.0  # unknown value: counted like 10, so that (x+1)^(10^10) is caught
    children = [_digits_bound(a) for a in expr.args]
    if isinstance(expr, sympy.Pow):
        base, exponent = children
        if base == 0.0:  # base 0 or +-1: the value is small but the exponent is evaluated
            return exponent
        return _grow(exponent) * base  # log10 |b^e| = |e| * log10 |b|, |e| <= 10^exponent
    if isinstance(expr, _FACTORIAL_LIKE):
        n = max(children, default=0.0)
        return _grow(n) * max(n, 1.0)  # log10 n! <= n * log10 n
    if isinstance(expr, sympy.Mul):
        return sum(children)
    return max(children, default=0.0) + 1.0


def _grow(log10_value: float) -> float:
    """10**log10_value, saturating to inf instead of overflowing."""
    return math.inf if log10_value > 300 else 10.0**log10_value


def magnitude_ok(parsed: list[Any]) -> bool:
    """False when a parsed answer (math-verify `parse` output) may force sympy to build an
    integer with more than MAX_DIGITS digits, e.g. `9^{9^{9^{9^{9}}}}` or `(10^{100})!`."""
    return all(_digits_bound(item) <= MAX_DIGITS for item in parsed)


def _strip_reference(answer: str) -> str:
    boxed = extract_boxed(answer)  # tolerate references stored as "\boxed{...}"
    return (boxed if boxed is not None else answer).strip().strip("$").strip()


@register_verifier("math")
def math_verifier(response: str, answer: str) -> float:
    """1.0 when the final boxed answer of `response` equals the bare reference `answer`
    mathematically (`1/2`, `0.5`, `\\frac{1}{2}`, `\\dfrac12` are equal), else 0.0."""
    if not isinstance(answer, str):
        return 0.0
    pred_text = extract_boxed(response)
    if pred_text is None or not pred_text.strip():
        return 0.0
    gold_text = _strip_reference(answer)
    if not gold_text:
        return 0.0
    if normalize_math(pred_text) == normalize_math(gold_text):
        return 1.0
    if len(pred_text) > MAX_SYMPY_CHARS or len(gold_text) > MAX_SYMPY_CHARS:
        return 0.0
    try:
        gold = parse("\\boxed{" + gold_text + "}", parsing_timeout=None)
        pred = parse("\\boxed{" + pred_text + "}", parsing_timeout=None)
        if not gold or not pred or not (magnitude_ok(gold) and magnitude_ok(pred)):
            return 0.0
        return 1.0 if verify(gold, pred, timeout_seconds=None) else 0.0
    except Exception:  # sympy/latex2sympy raise many types on garbage: a wrong answer
        return 0.0


def warm_up() -> None:
    """Run one small check so that lazy initialisation (regex compilation, sympy caches; ~0.1 s,
    several times that on a loaded machine) is not charged to the first item's time limit."""
    math_verifier("\\boxed{\\frac{1}{2}}", "0.5")
