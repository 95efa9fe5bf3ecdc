"""The built-in `countdown` task: reach a target from a few numbers with + - * / (a known
small-RL testbed where checking an answer is much easier than finding one).

    Numbers: 7 5 3. Target: 26.  ->  "7*3=21. 21+5=26. \\boxed{7*3+5}"

Row answer: the JSON text `{"numbers": [...], "target": T}`, scored by the `countdown`
verifier (`spark_mcore.rewards.countdown`). Levels 3, 4, 5 are the count of numbers shown;
levels 1 and 2 show three numbers from 1-9 with every value at most 30 (level 1: two of them
reach the target, the third is a distractor), small enough for a model trained from scratch
(`LEVELS`).

Instances are solvable by construction: each is generated from a random *chain* (the running
value combined with one unused number per step, `acc op n` or `n op acc`), with positive
integer intermediate values up to the level's bound (`MAX_INTERMEDIATE` at levels 3-5), exact
divisions only, no `*1` or `/1`, and the target in [1, the level's max target]. A chain uses
`LevelSpec.used` of the shown numbers (all of them, except at level 5 sometimes 4 and at
level 1 always 2; the others are distractors). Other solutions exist and the verifier accepts
any. Splits: a problem's key is its sorted numbers and target, hashed (sha256) into 5
buckets, one of which is the test split, so train and test never share a problem (in any
order of its numbers). Deterministic in (levels, split, size, seed); a larger size appends.

Worked solutions (the SFT warm start): the chain's steps, then the boxed expression. A share
of them (`SEARCH_SHARE`, by a hash of the problem) first write out one or two failed attempts
("7+3=10. 10+5=15, no.") before the steps that reach the target: the search, written out.
Wrong solutions (judge warm-start data, `wrong_solution`), one of `WRONG_KINDS`:
  miss    — another chain of the given numbers, honest steps, a value that is not the target;
  claim   — such a chain whose last step claims the target (the arithmetic is wrong there);
  foreign — the right chain with one number replaced by one that is not given;
  reuse   — the right chain with one number replaced by another given number, used twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from spark_mcore.types import Prompt

Split = Literal["train", "test"]
SOURCE = "countdown"
TASK = "countdown"  # the verifier's name
INSTRUCTION = "Use each number at most once with + - * / and parentheses. Put the expression in \\boxed{}."
MAX_TARGET = 100
MAX_INTERMEDIATE = 200
SEARCH_SHARE = 0.35  # worked solutions that write out failed attempts first
WRONG_KINDS = ("miss", "claim", "foreign", "reuse")
_TEST_BUCKETS, _NUM_BUCKETS = 1, 5
_MAX_MISSES = 2000  # draws in a row without a new problem before a split's pool counts as used up
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LevelSpec:
    count: int  # numbers shown
    max_number: int  # numbers are drawn from [1, max_number]
    used: tuple[int, ...] = ()  # how many numbers the chain uses (drawn uniformly); () = count
    max_intermediate: int = MAX_INTERMEDIATE  # bound on every step's result
    max_target: int = MAX_TARGET

    def chain_length(self, rng: random.Random) -> int:
        return rng.choice(self.used) if self.used else self.count


# Levels 3-5 are the count of numbers shown. Levels 1 and 2 also show 3 numbers, for a tiny
# model trained from scratch: one-digit numbers and small values, so that every step is an
# arithmetic fact seen many times (level 1: the target is reached with two of the three
# numbers, the third is a distractor; level 2: with all three).
LEVELS: dict[int, LevelSpec] = {
    1: LevelSpec(3, 9, used=(2,), max_intermediate=30, max_target=30),
    2: LevelSpec(3, 9, used=(3,), max_intermediate=30, max_target=30),
    3: LevelSpec(3, 12), 4: LevelSpec(4, 12), 5: LevelSpec(5, 15, used=(4, 5)),
}

Step = tuple[int, str, int, int]  # (left, op, right, result)


@dataclass(frozen=True)
class Chain:
    """A solution: leaves[0] combined with leaves[i + 1] by ops[i] (the leaf on the left when
    swaps[i]); `steps` and `expr` follow from those."""

    leaves: tuple[int, ...]
    ops: tuple[str, ...]
    swaps: tuple[bool, ...]
    steps: tuple[Step, ...]
    expr: str
    value: int


@dataclass(frozen=True)
class CountdownProblem:
    numbers: tuple[int, ...]  # in the order shown
    target: int
    chain: Chain
    level: int

    @property
    def key(self) -> str:
        return f"{'.'.join(map(str, sorted(self.numbers)))}>{self.target}"


# ---------------------------------------------------------------- chains
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _wrap(text: str, prec: int, need: int, strict: bool) -> str:
    return f"({text})" if prec < need or (strict and prec == need) else text


def combine(left: tuple[str, int], op: str, right: tuple[str, int]) -> tuple[str, int]:
    """(text, precedence) of `left op right` with the fewest parentheses (atoms have 3)."""
    p = _PREC[op]
    return f"{_wrap(left[0], left[1], p, False)}{op}{_wrap(right[0], right[1], p, op in '-/')}", p


def _apply(a: int, op: str, b: int, bound: int = MAX_INTERMEDIATE) -> int | None:
    """a op b when it is a valid chain step (positive integer up to `bound`), else None."""
    if op == "+":
        r = a + b
    elif op == "-":
        r = a - b
    elif op == "*":
        r = a * b if a != 1 and b != 1 else 0
    else:
        r = a // b if b > 1 and a % b == 0 else 0
    return r if 0 < r <= bound else None


def build_chain(leaves: list[int], ops: list[str], swaps: list[bool], bound: int = MAX_INTERMEDIATE
                ) -> Chain | None:
    """The chain of these leaves, ops and operand orders, or None when a step is invalid
    (a step's result must be a positive integer up to `bound`)."""
    acc, text = leaves[0], (str(leaves[0]), 3)
    steps: list[Step] = []
    for n, op, swap in zip(leaves[1:], ops, swaps, strict=True):
        a, b = (n, acc) if swap else (acc, n)
        r = _apply(a, op, b, bound)
        if r is None:
            return None
        text = combine((str(n), 3), op, text) if swap else combine(text, op, (str(n), 3))
        steps.append((a, op, b, r))
        acc = r
    return Chain(tuple(leaves), tuple(ops), tuple(swaps), tuple(steps), text[0], acc)


def random_chain(leaves: list[int], rng: random.Random, tries: int = 40, bound: int = MAX_INTERMEDIATE
                 ) -> Chain | None:
    """A chain over `leaves` in the given order with random ops (and operand orders), or None
    when `tries` draws found no valid one."""
    for _ in range(tries):
        ops = [rng.choice("+-*/") for _ in leaves[1:]]
        swaps = [op in "-/" and rng.random() < 0.3 for op in ops]
        chain = build_chain(leaves, ops, swaps, bound)
        if chain is not None:
            return chain
    return None


def steps_text(steps: tuple[Step, ...] | list[Step]) -> str:
    return " ".join(f"{a}{op}{b}={r}." for a, op, b, r in steps)


# ---------------------------------------------------------------- problems
def split_of(key: str) -> Split:
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % _NUM_BUCKETS
    return "test" if bucket < _TEST_BUCKETS else "train"


def _draw(level: int, rng: random.Random) -> CountdownProblem | None:
    spec = LEVELS[level]
    numbers = [rng.randint(1, spec.max_number) for _ in range(spec.count)]
    chain = random_chain(numbers[: spec.chain_length(rng)], rng, bound=spec.max_intermediate)
    if chain is None or chain.value > spec.max_target or chain.value in numbers:
        return None  # a target among the numbers is solved by copying it
    shown = list(numbers)
    rng.shuffle(shown)
    return CountdownProblem(tuple(shown), chain.value, chain, level)


def _stream(level: int, split: Split, seed: int) -> Iterator[CountdownProblem]:
    """Distinct problems of `level` in `split`, in a fixed pseudo-random order. A level's pool
    is finite (level 3 holds a few thousand problems): after `_MAX_MISSES` draws in a row find
    nothing new, the problems found so far repeat in a shuffled order (with a warning)."""
    rng = random.Random(f"countdown:{split}:{seed}:{level}")
    seen: dict[str, CountdownProblem] = {}
    misses = 0
    while misses < _MAX_MISSES:
        p = _draw(level, rng)
        if p is not None and p.key not in seen and split_of(p.key) == split:
            seen[p.key] = p
            misses = 0
            yield p
        else:
            misses += 1
    log.warning("countdown level %d: the %s pool seems exhausted after %d distinct problems; repeating them",
                level, split, len(seen))
    pool = list(seen.values())
    if not pool:
        raise ValueError(f"countdown level {level} has no {split} problems; check LEVELS[{level}]")
    while True:
        rng.shuffle(pool)
        yield from pool


def make_prompt(problem: CountdownProblem, split: str, index: int) -> Prompt:
    nums = " ".join(map(str, problem.numbers))
    text = f"Numbers: {nums}. Target: {problem.target}.\n{INSTRUCTION}"
    answer = json.dumps({"numbers": list(problem.numbers), "target": problem.target})
    return Prompt(
        id=f"countdown-{split}-{index:06d}",
        messages=[{"role": "user", "content": text}],
        answer=answer,
        task=TASK,
        meta={"source": SOURCE, "level": problem.level, "numbers": list(problem.numbers),
              "target": problem.target, "expr": problem.chain.expr,
              "chain": {"leaves": list(problem.chain.leaves), "ops": list(problem.chain.ops),
                        "swaps": list(problem.chain.swaps)}},
    )


def countdown_problems(levels: list[int], split: Split, size: int, seed: int) -> list[Prompt]:
    """`size` prompts of the given levels (each item's level drawn uniformly)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    bad = sorted(set(levels) - set(LEVELS))
    if not levels or bad:
        raise ValueError(f"data.levels: countdown levels are {sorted(LEVELS)} (3-5: the count of numbers; 1-2: "
                         f"three one-digit numbers, small values); got "
                         f"{list(levels)}. Fix: e.g. data.levels=[3,4]")
    uniq = sorted(set(levels))
    pick = random.Random(f"countdown:{split}:{seed}:levels")
    streams = {lv: _stream(lv, split, seed) for lv in uniq}
    return [make_prompt(next(streams[pick.choice(uniq)]), split, i) for i in range(size)]


# ---------------------------------------------------------------- worked solutions
def _problem(prompt: Prompt) -> tuple[list[int], int, Chain]:
    meta = prompt.meta
    try:
        numbers, target, c = [int(n) for n in meta["numbers"]], int(meta["target"]), meta["chain"]
        chain = build_chain([int(n) for n in c["leaves"]], [str(o) for o in c["ops"]],
                            [bool(s) for s in c["swaps"]])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"prompt {prompt.id!r} is not a builtin countdown prompt (meta lacks {e})") from e
    if chain is None or chain.value != target:
        raise ValueError(f"prompt {prompt.id!r}: its stored chain does not reach the target {target}")
    return numbers, target, chain


def _bound(prompt: Prompt) -> int:
    """The level's bound on step results (failed attempts stay in the level's range)."""
    spec = LEVELS.get(prompt.meta.get("level"))  # type: ignore[arg-type]
    return spec.max_intermediate if spec is not None else MAX_INTERMEDIATE


def _failed_attempt(numbers: list[int], target: int, rng: random.Random, bound: int = MAX_INTERMEDIATE
                    ) -> Chain | None:
    order = list(numbers)
    rng.shuffle(order)
    chain = random_chain(order[: rng.randint(2, len(order))], rng, bound=bound)
    return chain if chain is not None and chain.value != target else None


def worked_solution(prompt: Prompt) -> str:
    """Steps ending in \\boxed{expression}; a share of problems first shows failed attempts,
    each ending in ", no." (deterministic per prompt)."""
    numbers, target, chain = _problem(prompt)
    rng = random.Random(f"countdown-search:{prompt.meta.get('expr')}:{target}:{numbers}")
    parts = []
    if rng.random() < SEARCH_SHARE:
        for _ in range(1 if rng.random() < 0.7 else 2):
            failed = _failed_attempt(numbers, target, rng, _bound(prompt))
            # an attempt that starts like the solution teaches nothing about searching
            if failed is not None and failed.steps[0] != chain.steps[0]:
                parts.append(steps_text(failed.steps)[:-1] + ", no.")
    parts.append(steps_text(chain.steps))
    return " ".join(parts) + f" \\boxed{{{chain.expr}}}"


def right_solution(prompt: Prompt) -> str:
    """The direct worked solution (no search), as shown to a judge."""
    _, _, chain = _problem(prompt)
    return f"{steps_text(chain.steps)} \\boxed{{{chain.expr}}}"


def _render(chain: Chain) -> str:
    return f"{steps_text(chain.steps)} \\boxed{{{chain.expr}}}"


def wrong_solution(prompt: Prompt, rng: random.Random) -> tuple[str, str]:
    """(a wrong worked solution, its kind): the kind is drawn from WRONG_KINDS; one that does
    not apply falls back to the next kind (the last resort boxes the right expression plus 1)."""
    numbers, target, chain = _problem(prompt)
    start = rng.randrange(len(WRONG_KINDS))
    for k in range(len(WRONG_KINDS)):
        kind = WRONG_KINDS[(start + k) % len(WRONG_KINDS)]
        text = _WRONG[kind](numbers, target, chain, rng, _bound(prompt))
        if text is not None:
            return text, kind
    return f"{steps_text(chain.steps)} \\boxed{{{chain.expr}+1}}", "miss"


def _miss(numbers: list[int], target: int, chain: Chain, rng: random.Random, bound: int) -> str | None:
    for _ in range(10):
        failed = _failed_attempt(numbers, target, rng, bound)
        if failed is not None and failed.steps:
            return _render(failed)
    return None


def _claim(numbers: list[int], target: int, chain: Chain, rng: random.Random, bound: int) -> str | None:
    for _ in range(10):
        failed = _failed_attempt(numbers, target, rng, bound)
        if failed is not None and failed.steps:
            a, op, b, _ = failed.steps[-1]
            steps = (*failed.steps[:-1], (a, op, b, target))
            return f"{steps_text(steps)} \\boxed{{{failed.expr}}}"
    return None


def _is_wrong(chain: Chain, numbers: list[int], target: int) -> bool:
    """The verifier's verdict on the chain's expression is 0: another value, or numbers not given."""
    return chain.value != target or bool(Counter(chain.leaves) - Counter(numbers))


def _swap_leaf(chain: Chain, numbers: list[int], target: int, rng: random.Random, pool: list[int]) -> str | None:
    """The chain with one leaf replaced by a number from `pool` (honest steps), or None."""
    for _ in range(10):
        i = rng.randrange(len(chain.leaves))
        new = list(chain.leaves)
        new[i] = pool[rng.randrange(len(pool))]
        replayed = build_chain(new, list(chain.ops), list(chain.swaps)) if new[i] != chain.leaves[i] else None
        if replayed is not None and _is_wrong(replayed, numbers, target):
            return _render(replayed)
    return None


def _foreign(numbers: list[int], target: int, chain: Chain, rng: random.Random, bound: int) -> str | None:
    pool = [n for n in range(1, max(numbers) + 4) if n not in numbers]
    return _swap_leaf(chain, numbers, target, rng, pool) if pool else None


def _reuse(numbers: list[int], target: int, chain: Chain, rng: random.Random, bound: int) -> str | None:
    return _swap_leaf(chain, numbers, target, rng, numbers)


_WRONG = {"miss": _miss, "claim": _claim, "foreign": _foreign, "reuse": _reuse}


def corpus_texts(count: int = 300) -> list[str]:
    """Prompts and worked solutions for the built-in tokenizer's corpus (countdown runs)."""
    prompts = countdown_problems(sorted(LEVELS), "train", count, seed=1234)
    return [t for p in prompts for t in ("user\n" + p.messages[0]["content"], "assistant\n" + worked_solution(p))]


__all__ = ["INSTRUCTION", "LEVELS", "SOURCE", "TASK", "WRONG_KINDS", "Chain", "CountdownProblem", "build_chain",
           "corpus_texts", "countdown_problems", "make_prompt", "random_chain", "right_solution", "split_of",
           "worked_solution", "wrong_solution"]
