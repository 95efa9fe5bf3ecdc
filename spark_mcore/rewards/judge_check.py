"""Judge tasks scored on the written check as well as the verdict (`spark.judge_check`).

A SPARK judge task is normally scored by its final `\\boxed{Yes|No|A|B}` only (the `judge`
verifier). When the judge writes a check before its verdict (countdown: evaluate the box step
by step, its numbers against the given ones, value against target), rewarding the verdict alone
lets RL drift away from the check the warm start taught, e.g. to a constant "No". This module
lets a recycled judge task carry the reference check of the response it shows, and scores both:

  check writers   per source task, `(response, answer) -> (written check, verdict)`, registered
                  with `@register_check_writer("countdown")` (countdown_trace's `check_steps`);
  the answer      `judge_check_answer(label, check, weight)` -> JSON
                  `{"label": "No", "check": "7+7=14. ... 14 vs 15: 1 vs 1, 4 vs 5, differ.", "weight": 0.5}`;
  the verifier    `judge_check` (registered): reward = (1 - weight) * verdict + weight * steps,
                  verdict = the `judge` verifier on the label (0/1), steps = 2 * LCS / (n_ref +
                  n_written) over the sentences (`... .` steps) of the check written before the
                  last box and of the reference check, compared exactly after collapsing spaces.

So full credit needs the right verdict AND every reference step in order with nothing extra;
a right verdict after a wrong check earns 1 - weight plus the steps it got right. Bounded on any
input: the written check is cut to its first `MAX_CHECK_CHARS` characters and `MAX_STEPS` steps
(the LCS is at most MAX_STEPS^2 comparisons); a malformed answer scores 0; it never raises.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from spark_mcore.rewards.registry import register_verifier
from spark_mcore.rewards.verifiers import judge_verifier

JUDGE_CHECK_TASK = "judge_check"  # Prompt.task of judge tasks scored with their written check
MAX_CHECK_CHARS = 4000
MAX_STEPS = 64
_STEP_END = re.compile(r"(?<=\.)\s+")
_SPACES = re.compile(r"\s+")
_BOX = re.compile(r"\\box(?:ed)?\s*\{")


@runtime_checkable
class CheckWriter(Protocol):
    """Writes the reference check of `response` against a source task's `answer`:
    (the check's text without a verdict box, whether the response is right)."""

    def __call__(self, response: str, answer: str) -> tuple[str, bool]: ...


_WRITERS: dict[str, CheckWriter] = {}
_BUILTIN_WRITERS = ("spark_mcore.rewards.countdown_trace",)


def register_check_writer(task: str) -> Callable[[CheckWriter], CheckWriter]:
    """Decorator registering the check writer of source task `task` (one per task; the same
    function again, e.g. after a reload, replaces it)."""
    if not isinstance(task, str) or not task.strip():
        raise ValueError(f"register_check_writer: task must be a non-empty string, got {task!r}")

    def decorator(fn: CheckWriter) -> CheckWriter:
        old = _WRITERS.get(task)
        if old is not None and _identity(old) != _identity(fn):
            raise ValueError(f"check writer for {task!r} is already registered by {_identity(old)}")
        _WRITERS[task] = fn
        return fn

    return decorator


def get_check_writer(task: str) -> CheckWriter | None:
    """The check writer of source task `task`, or None when the task has none."""
    import importlib

    for module in _BUILTIN_WRITERS:
        importlib.import_module(module)
    return _WRITERS.get(task)


def _identity(fn: object) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def judge_check_answer(label: str, check: str, weight: float) -> str:
    """The reference a `judge_check` task carries (`Prompt.answer`)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"judge check weight must be in [0, 1], got {weight}")
    return json.dumps({"label": label, "check": check, "weight": weight})


def parse_judge_check_answer(answer: object) -> tuple[str, str, float] | None:
    """(label, check, weight) of a `judge_check_answer`, None when `answer` is not one."""
    if not isinstance(answer, str) or len(answer) > 4 * MAX_CHECK_CHARS or not answer.startswith("{"):
        return None
    try:
        d = json.loads(answer)
        label, check, weight = d["label"], d["check"], float(d["weight"])
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(label, str) or not isinstance(check, str) or not 0.0 <= weight <= 1.0:
        return None
    return label, check, weight


def verdict_label(answer: object) -> str:
    """The verdict label of a judge task's answer: a plain label (`judge`) or a `judge_check`
    answer's label; "" when neither."""
    parsed = parse_judge_check_answer(answer)
    if parsed is not None:
        return parsed[0]
    return answer if isinstance(answer, str) else ""


def check_steps_of(text: str) -> list[str]:
    """The sentences of a written check (`a+b=c.` steps), spaces collapsed, at most MAX_STEPS."""
    steps = []
    for part in _STEP_END.split(text[:MAX_CHECK_CHARS]):
        part = _SPACES.sub(" ", part).strip()
        if part:
            steps.append(part)
            if len(steps) == MAX_STEPS:
                break
    return steps


def written_check(response: str) -> str:
    """What a judge wrote before its last box (the whole response when it has no box)."""
    starts = [m.start() for m in _BOX.finditer(response[: 2 * MAX_CHECK_CHARS])]
    return response[: starts[-1]] if starts else response


def step_agreement(written: list[str], reference: list[str]) -> float:
    """2 * LCS / (len(written) + len(reference)) of two step lists (1.0 when both are empty)."""
    if not written and not reference:
        return 1.0
    prev = [0] * (len(reference) + 1)
    for w in written:
        row = [0]
        for j, r in enumerate(reference):
            row.append(prev[j] + 1 if w == r else max(prev[j + 1], row[j]))
        prev = row
    return 2.0 * prev[-1] / (len(written) + len(reference))


@register_verifier(JUDGE_CHECK_TASK)
def judge_check_verifier(response: str, answer: str) -> float:
    """(1 - weight) * (verdict right) + weight * step agreement with the reference check (see
    the module docstring); 0.0 for a malformed answer or a non-string response."""
    parsed = parse_judge_check_answer(answer)
    if parsed is None or not isinstance(response, str):
        return 0.0
    label, check, weight = parsed
    verdict = judge_verifier(response, label)
    steps = step_agreement(check_steps_of(written_check(response)), check_steps_of(check))
    return float(min(1.0, max(0.0, (1.0 - weight) * verdict + weight * steps)))


__all__ = ["JUDGE_CHECK_TASK", "CheckWriter", "check_steps_of", "get_check_writer", "judge_check_answer", "judge_check_verifier",
           "parse_judge_check_answer", "register_check_writer", "step_agreement", "verdict_label",
           "written_check"]
