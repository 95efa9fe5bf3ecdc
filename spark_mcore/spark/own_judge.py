"""Judge warm-start tasks from the model's OWN verified answers (`warmstart.judge_file`).

Synthetic wrong solutions (`warmstart_data`) teach a judge the format, but a tiny model's own
mistakes look different (numbers that are not given, a box that does not follow the steps), so
a judge trained on synthetic errors alone answers one constant verdict on its own answers. This
module turns verified groups of a model's samples on TRAINING prompts (never held-out ones)
into pointwise and pairwise SFT rows rendered with the recycler's templates and views:

  per group with a right and a wrong response (up to `per_group` distinct pairs of texts):
    pointwise  right -> "\\boxed{Yes}",  wrong -> "\\boxed{No}"   (one of each: balanced)
    pairwise   (right, wrong) -> "\\boxed{A}",  (wrong, right) -> "\\boxed{B}"   (both orders)

With `rationale=True` (countdown only: `spark_mcore.rewards.countdown_trace`) each target is
a written check before the verdict (`7+7=14. uses 7 7; given 6 7 9. 7 used twice. 14 vs 15:
differ. \\boxed{No}`; pairwise `A: <check> B: <check> \\boxed{A}`): a tiny judge can learn to write
the check step by step where it cannot compute the verdict in one token.

Only mixed groups are used, so every label has a row of the other label from the same prompt
(a judge cannot learn a per-prompt prior), which is also how the held-out judge set of
`tools/compare_spark_grpo.py` is built. Rows are saved as JSONL
({"prompt", "target", "kind", "label", "source_prompt_id"}) and read back by the assembly,
which mixes them into the warm start's judge batches (`file_judge_examples`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from spark_mcore.rewards.countdown_trace import check_steps, pairwise_trace
from spark_mcore.spark.templates import View, pick_template, render_pairwise, render_pointwise
from spark_mcore.spark.text import question_text, show_response
from spark_mcore.types import JUDGE_TASK, KIND_KEY, Prompt, RolloutGroup

Example = tuple[Prompt, str]
_KINDS = {"pointwise": ("Yes", "No"), "pairwise": ("A", "B")}
_RATIONALE_TASKS = ("countdown",)  # tasks with a written check (`rationale=True`)


@dataclass(frozen=True)
class OwnJudgeRow:
    """One judge SFT row: the task prompt's text and its target (`\\boxed{<label>}`, after the
    written check `rationale` when there is one)."""

    prompt: str
    kind: str
    label: str
    source_prompt_id: str
    rationale: str = ""

    @property
    def target(self) -> str:
        box = f"\\boxed{{{self.label}}}"
        return f"{self.rationale} {box}" if self.rationale else box


def _distinct(texts: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(t for t in texts if show_response(t, "cot") is not None))


def _view(rng: random.Random, content_mode: str) -> View:
    if content_mode == "both":
        return "cot" if rng.random() < 0.5 else "answer"
    return "answer" if content_mode == "answer" else "cot"


def _pointwise_rationale(text: str, label: str, answer: str, on: bool) -> str:
    """The written check of `text` (countdown), or "" when off or when its verdict disagrees with
    the label (a verifier timeout scored the sample; the bare verdict is then the safe target)."""
    if not on:
        return ""
    body, ok = check_steps(text, answer)
    return body if ok == (label == "Yes") else ""


def _pairwise_rationale(first: str, second: str, label: str, answer: str, on: bool) -> str:
    if not on:
        return ""
    trace = pairwise_trace(first, second, answer)
    return trace.rsplit(" ", 1)[0] if trace.endswith(f"\\boxed{{{label}}}") else ""


def _group_rows(group: RolloutGroup, seed: int, per_group: int, content_mode: str,
                rationale: bool = False) -> list[OwnJudgeRow]:
    """The rows of one group (none unless it holds a right and a wrong non-empty response)."""
    rng = random.Random(f"own-judge:{seed}:{group.prompt.id}")
    right = _distinct(r.completion.text for r in group.rollouts if r.correct)
    wrong = _distinct(r.completion.text for r in group.rollouts if not r.correct)
    rng.shuffle(right)
    rng.shuffle(wrong)
    question, pid, answer = question_text(group.prompt), group.prompt.id, str(group.prompt.answer)
    rows: list[OwnJudgeRow] = []
    for good, bad in list(zip(right, wrong, strict=False))[:per_group]:  # the shorter side bounds the pairs
        for text, label in ((good, "Yes"), (bad, "No")):
            view = _view(rng, content_mode)  # drawn before the label is used
            shown, used = show_response(text, view) or (text, "cot")
            rows.append(OwnJudgeRow(render_pointwise(pick_template("pointwise", rng), question, shown, used),
                                    "pointwise", label, pid, _pointwise_rationale(text, label, answer, rationale)))
        view = _view(rng, content_mode)
        template = pick_template("pairwise", rng)
        (g, gv), (b, bv) = show_response(good, view) or (good, "cot"), show_response(bad, view) or (bad, "cot")
        if gv != bv or g == b:  # both in one view, as the recycler shows pairs
            (g, gv), (b, bv) = show_response(good, "cot") or (good, "cot"), show_response(bad, "cot") or (bad, "cot")
        if g == b:
            continue
        rows.append(OwnJudgeRow(render_pairwise(template, question, g, b, gv), "pairwise", "A", pid,
                                _pairwise_rationale(good, bad, "A", answer, rationale)))
        rows.append(OwnJudgeRow(render_pairwise(template, question, b, g, gv), "pairwise", "B", pid,
                                _pairwise_rationale(bad, good, "B", answer, rationale)))
    return rows


def own_judge_rows(groups: Iterable[RolloutGroup], *, seed: int = 0, per_group: int = 1,
                   content_mode: str = "both", rationale: bool = False) -> list[OwnJudgeRow]:
    """Balanced pointwise and both-order pairwise rows from verified groups (module docstring).
    `per_group`: distinct (right, wrong) text pairs used per mixed group; `content_mode` as
    `spark.content_mode` ("answer", "cot" or "both"); `rationale`: targets with a written
    check (countdown groups only)."""
    if per_group < 1:
        raise ValueError(f"per_group must be >= 1, got {per_group}")
    if content_mode not in ("answer", "cot", "both"):
        raise ValueError(f"content_mode must be 'answer', 'cot' or 'both', got {content_mode!r}")
    groups = list(groups)
    if rationale and any(g.prompt.task not in _RATIONALE_TASKS for g in groups):
        bad = sorted({g.prompt.task for g in groups} - set(_RATIONALE_TASKS))
        raise ValueError(f"rationale=True: no written check for task(s) {bad} (tasks with one: "
                         f"{list(_RATIONALE_TASKS)}); drop --own-judge-rationale")
    return [row for g in groups for row in _group_rows(g, seed, per_group, content_mode, rationale)]


def save_rows(rows: Sequence[OwnJudgeRow], path: str | Path) -> None:
    with Path(path).open("w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r.prompt, "target": r.target, "kind": r.kind, "label": r.label,
                                "source_prompt_id": r.source_prompt_id, "rationale": r.rationale}) + "\n")


def load_rows(path: str | Path) -> list[OwnJudgeRow]:
    """Rows of a `save_rows` file; a bad line fails naming the file, the line and the field."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"warmstart.judge_file: {p} does not exist (write it with "
                         "tools/compare_spark_grpo.py --own-judge-samples, or clear the field)")
    rows = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            row = OwnJudgeRow(str(d["prompt"]), str(d["kind"]), str(d["label"]), str(d.get("source_prompt_id", "")),
                              str(d.get("rationale", "")))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{p}:{n}: not a judge row ({e!r}); each line needs prompt, kind, label") from e
        if row.label not in _KINDS.get(row.kind, ()) or not row.prompt.strip():
            raise ValueError(f"{p}:{n}: kind {row.kind!r} with label {row.label!r} (kinds: {_KINDS}) "
                             "or an empty prompt")
        rows.append(row)
    if not rows:
        raise ValueError(f"warmstart.judge_file: {p} holds no rows")
    return rows


def _example(row: OwnJudgeRow, index: int) -> Example:
    prompt = Prompt(id=f"{row.source_prompt_id or 'own'}#own-{row.kind}-{index}",
                    messages=[{"role": "user", "content": row.prompt}], answer=row.label, task=JUDGE_TASK,
                    meta={KIND_KEY: row.kind, "source_prompt_id": row.source_prompt_id, "own": True})
    return prompt, row.target


def file_judge_examples(rows: Sequence[OwnJudgeRow], share: float,
                        synthetic: Callable[[list[Prompt], int, int], list[Example]]
                        ) -> Callable[[list[Prompt], int, int], list[Example]]:
    """A `JudgeExamples` source: of `count` examples, round(share * count) are own rows (a seeded
    shuffle, repeated when there are fewer rows than that), the rest come from `synthetic`."""
    if not rows:
        raise ValueError("file_judge_examples needs at least one row")
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")

    def build(prompts: list[Prompt], count: int, seed: int) -> list[Example]:
        own = round(share * count)
        order = list(range(len(rows)))
        random.Random(f"own-judge-order:{seed}").shuffle(order)
        out = [_example(rows[order[i % len(order)]], i) for i in range(own)]
        return out + (synthetic(prompts, count - own, seed) if count > own else [])

    return build


__all__ = ["OwnJudgeRow", "file_judge_examples", "load_rows", "own_judge_rows", "save_rows"]
