"""Arithmetic drill rows for the warm start (`warmstart.drill_share`, issue 15 round seven).

Why: round seven's diagnosis found that 57 % of the countdown warm start's written steps are
false (`4*7=38`) and that a false step causes most of its wrong answers; a judge that must
recompute those steps fails the same way, so its errors correlate with the policy's. Drilling
every one-step fact of the level's value range makes steps right, so that wrong answers become
search errors (a value that misses the target, a number not given), which a check can catch.

    Compute: 7*3, 21-5, 9/3.   ->   "7*3=21. 21-5=16. 9/3=3."

Facts: every `a op b` with a in 1..bound and b in 1..small, or a in 1..small and b in 1..bound
(`op` in + - * /), whose value is an integer in 0..bound (exact divisions only), written in the
step format of worked solutions. Deterministic by seed.
"""

from __future__ import annotations

import random
from fractions import Fraction

from spark_mcore.types import Prompt

Fact = tuple[int, str, int, int]
DRILL_TASK = "countdown"  # only SFT uses the rows; their prompts are never verified


def drill_facts(bound: int = 30, small: int = 9) -> list[Fact]:
    """Every fact of the range, sorted (see the module docstring)."""
    if bound < 1 or small < 1:
        raise ValueError(f"drill range must be positive, got bound={bound}, small={small}")
    pairs = {(a, b) for a in range(1, bound + 1) for b in range(1, small + 1)}
    pairs |= {(b, a) for a, b in pairs}
    facts = []
    for a, b in sorted(pairs):
        for op in "+-*/":
            value = {"+": Fraction(a + b), "-": Fraction(a - b), "*": Fraction(a * b), "/": Fraction(a, b)}[op]
            if value.denominator == 1 and 0 <= value <= bound:
                facts.append((a, op, b, int(value)))
    return facts


def drill_examples(count: int, seed: int, bound: int = 30, small: int = 9, per_row: int = 4
                   ) -> list[tuple[Prompt, str]]:
    """`count` (prompt, target) rows of `per_row` random facts each."""
    facts = drill_facts(bound, small)
    rng = random.Random(f"drill:{seed}")
    out = []
    for i in range(count):
        chosen = [facts[rng.randrange(len(facts))] for _ in range(per_row)]
        question = "Compute: " + ", ".join(f"{a}{op}{b}" for a, op, b, _ in chosen) + "."
        answer = " ".join(f"{a}{op}{b}={c}." for a, op, b, c in chosen)
        prompt = Prompt(id=f"drill-{seed}-{i:06d}", messages=[{"role": "user", "content": question}],
                        answer="", task=DRILL_TASK, meta={"source": "drill"})
        out.append((prompt, answer))
    return out


__all__ = ["drill_examples", "drill_facts"]
