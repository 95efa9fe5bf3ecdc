"""The built-in `arith` task: procedurally generated integer arithmetic with worked solutions.

Sized for a ~1M-parameter model trained from scratch on CPU: prompts are a few tokens, worked
solutions are column-method steps of at most ~40 tokens whose every step is one memorisable
fact (a one-digit sum, difference or product plus a carry), and the boxed answer is read off
the steps (tens result followed by the units digit).

Levels (a registry; `register_level` adds more; no expression belongs to two levels):
  1: a+b      a, b in [0, 99], at least one of them one digit
  2: a+b, a-b a, b in [10, 99], a >= b so answers stay non-negative
  3: a*b      one operand in [2, 9], the other in [10, 99] (either order)
  4: a+b*c, a*b+c, a*b-c   product of two one-digit numbers in [2, 9], additive term in
     [1, 99], and for a*b-c the term is at most the product (answers stay non-negative)

Splits: every distinct problem belongs to exactly one split, decided by a stable hash
(sha256) of its *split key*. The key is commutation-invariant (37+45 and 45+37 share a key),
so a test problem's mirror image is never trained on. Sampling draws each level's split pool
without replacement and only repeats problems once that pool is exhausted (a warning says so).
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from spark_mcore.types import Prompt

log = logging.getLogger(__name__)

Split = Literal["train", "test"]
INSTRUCTION = "Solve step by step. Put the final answer in \\boxed{}."
# One problem in 5 (by hash bucket) is held out: train/test pools are ~80/20 of each level.
_TEST_BUCKETS = 1
_NUM_BUCKETS = 5


@dataclass(frozen=True)
class ArithProblem:
    """`expr` is the text shown to the model (e.g. "37+45"); `key` decides the split."""

    expr: str
    value: int
    key: str
    level: int


LevelEnumerator = Callable[[], list[ArithProblem]]
_LEVELS: dict[int, LevelEnumerator] = {}
_POOL_CACHE: dict[int, list[ArithProblem]] = {}


def register_level(level: int) -> Callable[[LevelEnumerator], LevelEnumerator]:
    """Registers a function listing every problem of a difficulty level (in a fixed order)."""

    def deco(fn: LevelEnumerator) -> LevelEnumerator:
        if level in _LEVELS:
            raise ValueError(f"arith level {level} is registered twice")
        _LEVELS[level] = fn
        return fn

    return deco


def available_levels() -> list[int]:
    return sorted(_LEVELS)


def _sum_key(a: str, b: str) -> str:
    return "+".join(sorted((a, b)))


def _prod_key(a: int, b: int) -> str:
    return "*".join(sorted((str(a), str(b))))


@register_level(1)
def _level1() -> list[ArithProblem]:
    # At least one one-digit operand: level 2 owns the two-digit + two-digit sums, so no
    # problem text belongs to two levels and a multi-level split has no repeats.
    pairs = [(a, b) for a in range(100) for b in range(100) if a < 10 or b < 10]
    return [ArithProblem(f"{a}+{b}", a + b, _sum_key(str(a), str(b)), 1) for a, b in pairs]


@register_level(2)
def _level2() -> list[ArithProblem]:
    out = [
        ArithProblem(f"{a}+{b}", a + b, _sum_key(str(a), str(b)), 2)
        for a in range(10, 100)
        for b in range(10, 100)
    ]
    out += [ArithProblem(f"{a}-{b}", a - b, f"{a}-{b}", 2) for a in range(10, 100) for b in range(10, a + 1)]
    return out


@register_level(3)
def _level3() -> list[ArithProblem]:
    out = []
    for d in range(2, 10):
        for n in range(10, 100):
            out.append(ArithProblem(f"{d}*{n}", d * n, _prod_key(d, n), 3))
            out.append(ArithProblem(f"{n}*{d}", d * n, _prod_key(d, n), 3))
    return out


@register_level(4)
def _level4() -> list[ArithProblem]:
    out = []
    for b in range(2, 10):
        for c in range(2, 10):
            prod = _prod_key(b, c)
            for a in range(1, 100):
                out.append(ArithProblem(f"{a}+{b}*{c}", a + b * c, _sum_key(str(a), prod), 4))
                out.append(ArithProblem(f"{b}*{c}+{a}", a + b * c, _sum_key(str(a), prod), 4))
                if a <= b * c:
                    out.append(ArithProblem(f"{b}*{c}-{a}", b * c - a, f"{prod}-{a}", 4))
    return out


def split_of(key: str) -> Split:
    """The split a problem belongs to, from a stable hash of its split key."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % _NUM_BUCKETS
    return "test" if bucket < _TEST_BUCKETS else "train"


def level_pool(level: int, split: Split) -> list[ArithProblem]:
    """Every distinct problem of `level` that belongs to `split`, in a fixed order."""
    if level not in _LEVELS:
        raise ValueError(
            f"data.levels: unknown arith level {level}; available levels are {available_levels()}"
        )
    if level not in _POOL_CACHE:
        _POOL_CACHE[level] = _LEVELS[level]()
    return [p for p in _POOL_CACHE[level] if split_of(p.key) == split]


def make_prompt(problem: ArithProblem, split: str, index: int) -> Prompt:
    text = f"{problem.expr}=?\n{INSTRUCTION}"
    return Prompt(
        id=f"arith-{split}-{index:06d}",
        messages=[{"role": "user", "content": text}],
        answer=str(problem.value),
        task="math",
        meta={"source": "arith", "level": problem.level, "expr": problem.expr},
    )


def _draws(pool: list[ArithProblem], rng: random.Random, level: int, split: str) -> Iterator[ArithProblem]:
    """Yields pool items in random order without replacement, reshuffling once exhausted."""
    order = list(range(len(pool)))
    rounds = 0
    while True:
        rng.shuffle(order)
        if rounds == 1:
            log.warning(
                "arith level %d: the %s pool has only %d distinct problems; repeating them",
                level,
                split,
                len(pool),
            )
        for i in order:
            yield pool[i]
        rounds += 1


def arith_problems(levels: list[int], split: Split, size: int, seed: int) -> list[Prompt]:
    """`size` prompts of the given levels (each item's level drawn uniformly), deterministic
    in (levels, split, size, seed); the test and train splits never share a problem text."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if not levels:
        raise ValueError("data.levels must name at least one arith level, e.g. [1, 2]")
    uniq = sorted(set(levels))
    # Independent streams per role so that changing `size` only appends problems.
    pick_rng = random.Random(f"arith:{split}:{seed}:levels")
    streams = {
        lv: _draws(level_pool(lv, split), random.Random(f"arith:{split}:{seed}:{lv}"), lv, split)
        for lv in uniq
    }
    return [make_prompt(next(streams[pick_rng.choice(uniq)]), split, i) for i in range(size)]


# ---------------------------------------------------------------- worked solutions
_EXPR_RE = re.compile(r"^\d+([+*-]\d+)+$")


def _column_add(a: int, b: int) -> list[str]:
    """Column addition of two numbers < 100. Units step carries; the tens step is the prefix."""
    if a < 10 and b < 10:
        return [f"{a}+{b}={a + b}."]
    s = a % 10 + b % 10
    first = f"{a % 10}+{b % 10}={s}" + (", carry 1." if s >= 10 else ".")
    carry = "+1" if s >= 10 else ""
    return [first, f"{a // 10}+{b // 10}{carry}={a // 10 + b // 10 + s // 10}."]


def _column_sub(a: int, b: int) -> list[str]:
    """Column subtraction a-b with 0 <= b <= a < 100; the leading zero is dropped in the box."""
    if a < 10:
        return [f"{a}-{b}={a - b}."]
    au, bu = a % 10, b % 10
    if au >= bu:
        return [f"{au}-{bu}={au - bu}.", f"{a // 10}-{b // 10}={a // 10 - b // 10}."]
    return [f"{au + 10}-{bu}={au + 10 - bu}, borrow 1.", f"{a // 10}-1-{b // 10}={a // 10 - 1 - b // 10}."]


def _column_mul(n: int, d: int) -> list[str]:
    """n * d with d one digit and n < 100: units product carries its tens into the tens step."""
    if n < 10:
        return [f"{n}*{d}={n * d}."]
    p = (n % 10) * d
    first = f"{n % 10}*{d}={p}" + (f", carry {p // 10}." if p >= 10 else ".")
    carry = f"+{p // 10}" if p >= 10 else ""
    return [first, f"{n // 10}*{d}{carry}={(n // 10) * d + p // 10}."]


def _solve_steps(expr: str) -> tuple[list[str], int]:
    """Steps and value for the expression shapes the levels produce."""
    if not _EXPR_RE.match(expr):
        raise ValueError(f"arith expression {expr!r} is not digits joined by + - *")
    terms = re.split(r"([+-])", expr)
    if len(terms) == 1:  # a pure product a*b: column method, the one-digit factor on the right
        a, b = (int(x) for x in expr.split("*"))
        n, d = (a, b) if b < 10 else (b, a)
        return _column_mul(n, d), a * b
    if len(terms) != 3:
        raise ValueError(f"arith expression {expr!r} has more than two additive terms")
    steps: list[str] = []
    vals: list[int] = []
    for t in (terms[0], terms[2]):
        if "*" in t:
            x, y = (int(v) for v in t.split("*"))
            steps.append(f"{x}*{y}={x * y}.")  # a one-digit fact, stated before the column op
            vals.append(x * y)
        else:
            vals.append(int(t))
    a, b = vals
    op = terms[1]
    if steps:
        steps.append(f"{a}{op}{b}:")
    if op == "+":
        return steps + _column_add(a, b), a + b
    if b > a:
        raise ValueError(f"arith expression {expr!r} has a negative result; the solver writes a >= b")
    return steps + _column_sub(a, b), a - b


def solve(expr: str) -> tuple[str, int]:
    """(worked solution text ending in \\boxed{value}, value) for an arith expression."""
    steps, value = _solve_steps(expr)
    return " ".join(steps) + f" \\boxed{{{value}}}", value


def worked_solution(prompt: Prompt) -> str:
    """Short column-method solution ending with \\boxed{ANSWER}, e.g. for 37+45:
    "7+5=12, carry 1. 3+4+1=8. \\boxed{82}"."""
    expr = prompt.meta.get("expr")
    if not isinstance(expr, str):
        raise ValueError(
            f"prompt {prompt.id!r} has no meta['expr']: worked solutions exist only for builtin arith prompts"
        )
    text, value = solve(expr)
    if str(value) != prompt.answer:
        raise ValueError(f"prompt {prompt.id!r}: answer {prompt.answer!r} disagrees with {expr} = {value}")
    return text


__all__ = [
    "INSTRUCTION",
    "ArithProblem",
    "register_level",
    "available_levels",
    "split_of",
    "level_pool",
    "make_prompt",
    "arith_problems",
    "solve",
    "worked_solution",
]
