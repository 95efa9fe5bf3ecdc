"""Worked solutions of the built-in arith task, right and wrong, for SFT warm starts and the
reward benchmark. Wrong ones come from a registry of error kinds (`ERRORS`):
  final   - the steps are right, the boxed answer is off by 1, 2 or 10;
  step    - the last step's result is off by one and the box follows it consistently;
  operand - an operand is misread (one more or one less) and the whole solution follows it.
The reward tasks built from them live in spark_mcore.spark.warmstart_data.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from spark_mcore.data.arith import solve

_LAST_STEP = re.compile(r"=(\d+)\.(?=[^=]*$)")  # the result of the last step before the box
_OPERAND = re.compile(r"\d+")


@dataclass(frozen=True)
class Worked:
    """A worked solution text and the value in its box."""

    text: str
    value: int


# ---------------------------------------------------------------- wrong solutions
# An error kind takes (expression, rng) and returns a wrong worked solution, or None when it
# does not apply to this expression (the caller then falls back to "final").
ErrorFn = Callable[[str, random.Random], "Worked | None"]
ERRORS: dict[str, ErrorFn] = {}


def register_error(name: str) -> Callable[[ErrorFn], ErrorFn]:
    def deco(fn: ErrorFn) -> ErrorFn:
        if name in ERRORS:
            raise ValueError(f"error kind '{name}' is registered twice")
        ERRORS[name] = fn
        return fn

    return deco


def _box(steps: str, value: int) -> str:
    return f"{steps} \\boxed{{{value}}}"


def _steps_of(expr: str) -> tuple[str, int]:
    text, value = solve(expr)
    return text[: text.rindex(" \\boxed{")], value


@register_error("final")
def _final_error(expr: str, rng: random.Random) -> Worked | None:
    steps, value = _steps_of(expr)
    deltas = [d for d in (1, -1, 2, -2, 10, -10) if value + d >= 0]
    wrong = value + deltas[rng.randrange(len(deltas))]
    return Worked(_box(steps, wrong), wrong)


@register_error("step")
def _step_error(expr: str, rng: random.Random) -> Worked | None:
    steps, value = _steps_of(expr)
    match = _LAST_STEP.search(steps)
    if match is None:
        return None
    last = int(match.group(1))
    # The box is the last step's result (one column) or that result followed by the units
    # digit (two columns); 0 = 0 cannot tell which, so that case is left to other kinds.
    if last == value != 0:
        place = 1
    elif value // 10 == last != value:
        place = 10
    else:
        return None
    delta = 1 if last == 0 or rng.random() < 0.5 else -1
    new_steps = steps[: match.start(1)] + str(last + delta) + steps[match.end(1) :]
    return Worked(_box(new_steps, value + delta * place), value + delta * place)


@register_error("operand")
def _operand_error(expr: str, rng: random.Random) -> Worked | None:
    _, value = _steps_of(expr)
    spans = [m.span() for m in _OPERAND.finditer(expr)]
    rng.shuffle(spans)
    for start, end in spans:
        operand = int(expr[start:end])
        for delta in rng.sample((1, -1), 2):
            # same digit count keeps the misread expression inside the solver's shapes
            changed = str(operand + delta)
            if operand + delta < 0 or len(changed) != end - start:
                continue
            try:
                text, wrong = solve(expr[:start] + changed + expr[end:])
            except ValueError:  # e.g. a subtraction that would go negative
                continue
            if wrong != value:
                return Worked(text, wrong)
    return None


def wrong_solution(expr: str, rng: random.Random) -> tuple[Worked, str]:
    """(a wrong worked solution of `expr`, the error kind used); the kind is drawn uniformly
    from `ERRORS` and falls back to "final" when it does not apply."""
    names = sorted(ERRORS)
    name = names[rng.randrange(len(names))]
    worked = ERRORS[name](expr, rng)
    if worked is None:
        name, worked = "final", ERRORS["final"](expr, rng)
    assert worked is not None and worked.value != solve(expr)[1]
    return worked, name


def right_solution(expr: str) -> Worked:
    text, value = solve(expr)
    return Worked(text, value)


__all__ = ["ERRORS", "Worked", "register_error", "right_solution", "wrong_solution"]
