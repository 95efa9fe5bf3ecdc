"""Arithmetic drill rows for the warm start (`warmstart.drill_share`, issue 15 round seven).

Why: round seven's diagnosis found that 57 % of the countdown warm start's written steps are
false (`4*7=38`) and that a false step causes most of its wrong answers; a judge that must
recompute those steps fails the same way, so its errors correlate with the policy's. Drilling
every one-step fact of the level's value range makes steps right, so that wrong answers become
search errors (a value that misses the target, a number not given), which a check can catch.

    Compute: 7*3, 21-5, 9/3.   ->   "7*3=21. 21-5=16. 9/3=3."
    Compare: 27 vs 18, 18 vs 18.   ->   "27 vs 18: 2 vs 1, differ. 18 vs 18: 1 vs 1, 8 vs 8, same."
                                       (`warmstart.drill_compare`, issue 15 round nine)

Facts: every `a op b` with a in 1..bound and b in 1..small, or a in 1..small and b in 1..bound
(`op` in + - * /), whose value is an integer in 0..bound (exact divisions only), written in the
step format of worked solutions. Deterministic by seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable
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


def compare_pairs(count: int, rng: random.Random, bound: int = 99) -> list[tuple[int, int]]:
    """`count` (value, target) pairs, target in 1..bound: half equal, a quarter of the same
    digit count with one digit changed (the near misses a copying judge calls `same`), a
    quarter any value in 0..bound."""
    out = []
    for _ in range(count):
        target, kind = rng.randint(1, bound), rng.random()
        value = target
        if 0.5 <= kind < 0.75:
            digits = list(str(target))
            i = rng.randrange(len(digits))
            choices = [d for d in "0123456789" if d != digits[i] and not (i == 0 and d == "0" and len(digits) > 1)]
            digits[i] = rng.choice(choices)
            value = int("".join(digits))
        elif kind >= 0.75:
            value = rng.randint(0, bound)
        out.append((value, target))
    return out


def compare_examples(count: int, seed: int, writer: Callable[[Fraction, int], str], bound: int = 99,
                     per_row: int = 3) -> list[tuple[Prompt, str]]:
    """`count` comparison drill rows: `Compare: 27 vs 18, 18 vs 18.` -> each pair's comparison
    as the written check has it (`writer`, e.g. `countdown_trace.compare_text`:
    `27 vs 18: 2 vs 1, differ. 18 vs 18: 1 vs 1, 8 vs 8, same.`), so that the decision is
    trained on the digits alone, apart from any response that claims a value."""
    rng = random.Random(f"compare-drill:{seed}")
    out = []
    for i in range(count):
        pairs = compare_pairs(per_row, rng, bound)
        question = "Compare: " + ", ".join(f"{v} vs {t}" for v, t in pairs) + "."
        answer = " ".join(writer(Fraction(v), t) for v, t in pairs)
        prompt = Prompt(id=f"compare-drill-{seed}-{i:06d}", messages=[{"role": "user", "content": question}],
                        answer="", task=DRILL_TASK, meta={"source": "drill"})
        out.append((prompt, answer))
    return out


__all__ = ["compare_examples", "compare_pairs", "drill_examples", "drill_facts"]
