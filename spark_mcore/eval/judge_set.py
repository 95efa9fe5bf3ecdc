"""A fixed held-out judge set that several processes share: built once, under a file lock, then
loaded by every later reader; and the whole held-out pool of a builtin task's test split.

Why: a comparison whose arms and seeds are each scored on their OWN judge set (built from
different samples) mixes the sets' differences into the seed spread. One set, built once from one
model's samples with a fixed seed and read by every seed and arm, scores all of them on the same
rows, so the spread left is the training's.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from spark_mcore.eval.reward_bench import HeldOut, load_pair_rows, load_point_rows, save_jsonl
from spark_mcore.types import Prompt

PAIRS, POINTS, DONE = "judge_pairs.jsonl", "judge_points.jsonl", "done.json"


def distinct_prompts(prompts: Sequence[Prompt]) -> list[Prompt]:
    """The prompts before the first whose (question, answer) repeats an earlier one's.

    A builtin split asked for more problems than its pool holds repeats the pool (countdown
    does, after a warning), so loading a size above the pool and cutting here gives the pool
    itself, in its fixed order: the first k of it are what a size of k would load."""
    seen: set[tuple[str, str]] = set()
    out: list[Prompt] = []
    for p in prompts:
        key = (json.dumps(p.messages, sort_keys=True), p.answer)
        if key in seen:
            break
        seen.add(key)
        out.append(p)
    return out


def load_judge_set(directory: Path) -> HeldOut:
    """The rows saved by `shared_judge_set` (or by any writer of the two JSONL files)."""
    return HeldOut(pairs=load_pair_rows(directory / PAIRS), points=load_point_rows(directory / POINTS))


def shared_judge_set(directory: Path, build: Callable[[], HeldOut], info: dict | None = None
                     ) -> tuple[HeldOut, bool]:
    """(rows, built here): the set in `directory` when a finished one is there, else `build()`
    saved there. Processes that call this at once on one directory build it once: the others
    wait on `<directory>.lock` and then load it. `done.json` (with `info` and the row counts) is
    written last, so a build that died half-way is rebuilt, never read."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.with_name(directory.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if build() raises
        if (directory / DONE).is_file():
            return load_judge_set(directory), False
        rows = build()
        if not rows.pairs and not rows.points:
            raise RuntimeError(f"the judge set for {directory} came out empty: nothing to score judges on")
        directory.mkdir(parents=True, exist_ok=True)
        save_jsonl(rows.pairs, directory / PAIRS)
        save_jsonl(rows.points, directory / POINTS)
        meta = {**(info or {}), "pairs": len(rows.pairs), "points": len(rows.points)}
        (directory / DONE).write_text(json.dumps(meta, indent=2))
        return rows, True
