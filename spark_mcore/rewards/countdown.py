"""The `countdown` verifier: does the boxed arithmetic expression reach the target?

    get_verifier("countdown")(response, '{"numbers": [3, 7, 5], "target": 26}')

Rules (the built-in `countdown` task, `spark_mcore.data.countdown`):
  - the expression is the content of the response's last `\\boxed{...}`; no box -> 0.0;
  - integer literals (no sign, no decimals), binary `+ - * /` (also `×`, `÷`, `\\times`,
    `\\cdot`, `\\div`) and parentheses; anything else (letters, `**`, `^`, `=`, unary minus,
    names such as `__import__`) -> 0.0;
  - each given number used at most once, counted as a multiset (two 5s given: two 5s allowed);
    a literal that is not among the numbers -> 0.0; numbers may be left unused;
  - exact rational arithmetic (`fractions.Fraction`): intermediate values need not be integers
    (`(1+1/3)*3` reaches 4), division by zero -> 0.0;
  - 1.0 iff the value equals the target, else 0.0.
Never `eval`: a hand-written tokenizer and recursive-descent parser. Work is bounded on any
input: the box is found in linear time, expressions longer than `MAX_EXPR_CHARS` or nested
deeper than `MAX_DEPTH` are refused before any arithmetic, literals have at most
`MAX_LITERAL_DIGITS` digits and there are at most as many literals as given numbers, so every
Fraction stays small. The function never raises.
"""

from __future__ import annotations

import json
from collections import Counter
from fractions import Fraction

from spark_mcore.rewards.boxed import extract_boxed
from spark_mcore.rewards.registry import register_verifier

MAX_EXPR_CHARS = 256
MAX_DEPTH = 16
MAX_LITERAL_DIGITS = 6
MAX_NUMBERS = 16  # a reference with more numbers is refused (the task uses 3-5)
MAX_ANSWER_CHARS = 1024
_OPS = {"+": "+", "-": "-", "*": "*", "/": "/", "×": "*", "÷": "/", "·": "*"}
_LATEX_OPS = {"\\times": "*", "\\cdot": "*", "\\div": "/"}
_SPACE = frozenset(" \t\n\r")


class _Reject(Exception):
    """The expression breaks a rule; the verifier scores it 0."""


def parse_answer(answer: object) -> tuple[list[int], int] | None:
    """(numbers, target) from the reference JSON text, or None when it is malformed."""
    if not isinstance(answer, str) or len(answer) > MAX_ANSWER_CHARS:
        return None
    try:
        data = json.loads(answer)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    numbers, target = data.get("numbers"), data.get("target")
    if not isinstance(numbers, list) or not 0 < len(numbers) <= MAX_NUMBERS:
        return None
    if not all(_is_small_int(n) and n >= 0 for n in numbers) or not _is_small_int(target):
        return None
    return list(numbers), int(target)


def _is_small_int(value: object) -> bool:
    return type(value) is int and abs(value) < 10**MAX_LITERAL_DIGITS


def tokenize(expr: str) -> list[str]:
    """Tokens: integer literals (as digit strings), `+ - * /` and parentheses. Raises _Reject
    on any other symbol, on a too-long literal and on a too-long expression."""
    if len(expr) > MAX_EXPR_CHARS:
        raise _Reject("expression too long")
    tokens: list[str] = []
    i, n = 0, len(expr)
    while i < n:
        ch = expr[i]
        if ch in _SPACE:
            i += 1
        elif "0" <= ch <= "9":  # ASCII digits only: str.isdigit() accepts '²' and '٣'
            j = i
            while j < n and "0" <= expr[j] <= "9":
                j += 1
            if j - i > MAX_LITERAL_DIGITS:
                raise _Reject("literal too long")
            tokens.append(expr[i:j])
            i = j
        elif ch in _OPS:
            if ch == "*" and i + 1 < n and expr[i + 1] == "*":
                raise _Reject("no exponentiation")
            tokens.append(_OPS[ch])
            i += 1
        elif ch in "()":
            tokens.append(ch)
            i += 1
        elif ch == "\\":
            i = _latex_op(expr, i, tokens)
        else:
            raise _Reject(f"unknown symbol {ch!r}")
    return tokens


def _latex_op(expr: str, i: int, tokens: list[str]) -> int:
    for name, op in _LATEX_OPS.items():
        end = i + len(name)
        # the command must end there: `\timesx` is not `\times` followed by `x`
        if expr.startswith(name, i) and not (end < len(expr) and expr[end].isalpha()):
            tokens.append(op)
            return end
    raise _Reject("unknown LaTeX command")


class _Parser:
    """expr := term (('+' | '-') term)* ; term := factor (('*' | '/') factor)* ;
    factor := INT | '(' expr ')'. Evaluates while parsing, with Fractions."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.literals: list[int] = []

    def parse(self) -> Fraction:
        if not self.tokens:
            raise _Reject("empty expression")
        value = self._expr(0)
        if self.pos != len(self.tokens):
            raise _Reject(f"unexpected {self.tokens[self.pos]!r}")
        return value

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _expr(self, depth: int) -> Fraction:
        value = self._term(depth)
        while self._peek() in ("+", "-"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self._term(depth)
            value = self._apply(op, value, rhs)
        return value

    def _term(self, depth: int) -> Fraction:
        value = self._factor(depth)
        while self._peek() in ("*", "/"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self._factor(depth)
            value = self._apply(op, value, rhs)
        return value

    def _apply(self, op: str, lhs: Fraction, rhs: Fraction) -> Fraction:
        """One binary operation, in evaluation order (a subclass may record it as a step)."""
        if op == "/" and rhs == 0:
            raise _Reject("division by zero")
        if op == "+":
            return lhs + rhs
        if op == "-":
            return lhs - rhs
        return lhs * rhs if op == "*" else lhs / rhs

    def _factor(self, depth: int) -> Fraction:
        tok = self._peek()
        if tok is None:
            raise _Reject("expression ends early")
        self.pos += 1
        if tok == "(":
            if depth >= MAX_DEPTH:
                raise _Reject("nested too deeply")
            value = self._expr(depth + 1)
            if self._peek() != ")":
                raise _Reject("unbalanced parenthesis")
            self.pos += 1
            return value
        if tok.isdigit():
            self.literals.append(int(tok))
            return Fraction(int(tok))
        raise _Reject(f"unexpected {tok!r}")  # an operator where a number belongs (unary signs too)


def evaluate(expr: str, numbers: list[int]) -> Fraction:
    """The exact value of `expr` under the rules; raises _Reject when it breaks one."""
    tokens = tokenize(expr)
    literal_count = sum(t.isdigit() for t in tokens)
    if literal_count > len(numbers):  # checked before any arithmetic: bounds the work
        raise _Reject("more literals than numbers")
    parser = _Parser(tokens)
    value = parser.parse()
    if Counter(parser.literals) - Counter(numbers):
        raise _Reject("a number is not given or used too often")
    return value


def check_expression(expr: str, numbers: list[int], target: int) -> bool:
    """True iff `expr` follows the rules and equals `target` (never raises on a string)."""
    try:
        return evaluate(expr, numbers) == target
    except _Reject:
        return False


@register_verifier("countdown")
def countdown_verifier(response: str, answer: str) -> float:
    """1.0 when the last boxed expression of `response` uses only the numbers of `answer`
    (each at most once) and equals its target, else 0.0 (see the module docstring)."""
    try:
        ref = parse_answer(answer)
        expr = extract_boxed(response)
        if ref is None or expr is None:
            return 0.0
        return float(check_expression(expr, *ref))
    except Exception:  # the rules above refuse bad input; this only guards the contract
        return 0.0


__all__ = ["MAX_DEPTH", "MAX_EXPR_CHARS", "check_expression", "countdown_verifier", "evaluate", "parse_answer",
           "tokenize"]
