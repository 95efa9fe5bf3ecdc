"""Judge accuracy of the policy model, RewardBench-style, through the engine protocol.

Pairwise rows (JSONL): {"question" | "prompt": str, "chosen": str, "rejected": str,
"images"?: [str], "id"?: str}. Each row is asked in both orders (chosen as A, then as B) with
the same template, which cancels position bias; accuracy = correct verdicts / (2 * rows).
Pointwise rows (JSONL): {"question" | "prompt", "response": str, "label": "Yes" | "No"
(or true / false), "images"?, "id"?}; accuracy = correct verdicts / rows.
Held-out sets can also be built from verified rollout groups or (prompt, right, wrong) triples.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spark_mcore.rollout.base import RolloutEngine, SamplingParams
from spark_mcore.spark.judging import (
    EncodeFn,
    JudgeFn,
    default_judge,
    generate_texts,
    greedy_params,
    parse_verdict,
    user_prompt,
)
from spark_mcore.spark.templates import View, pick_template, render_pairwise, render_pointwise
from spark_mcore.spark.text import question_text, show_response, strip_special_tokens
from spark_mcore.types import Prompt, RolloutGroup


@dataclass(frozen=True)
class PairRow:
    question: str
    chosen: str
    rejected: str
    images: tuple[str, ...] = ()
    id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "question": self.question,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "images": list(self.images),
        }


@dataclass(frozen=True)
class PointRow:
    question: str
    response: str
    label: str  # "Yes" (the response is right) or "No"
    images: tuple[str, ...] = ()
    id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "question": self.question,
            "response": self.response,
            "label": self.label,
            "images": list(self.images),
        }


@dataclass
class HeldOut:
    pairs: list[PairRow] = field(default_factory=list)
    points: list[PointRow] = field(default_factory=list)


@dataclass
class PairwiseResult:
    """accuracy over both orders; pair_accuracy = rows judged right in both orders;
    a_rate = share of parsed verdicts that were "A" (0.5 = no position preference)."""

    accuracy: float
    pair_accuracy: float
    a_rate: float
    unparsable_rate: float
    num_rows: int
    verdicts: list[tuple[str | None, str | None]]  # (chosen shown as A, chosen shown as B)


@dataclass
class PointwiseResult:
    """accuracy over all rows, and separately on rows labelled Yes and No (None if absent)."""

    accuracy: float
    accuracy_yes: float | None
    accuracy_no: float | None
    unparsable_rate: float
    num_rows: int
    verdicts: list[str | None]


def _text_field(row: dict[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: '{key}' must be a non-empty string, got {value!r}")
    return value


def _common(row: Any, where: str) -> tuple[str, tuple[str, ...], str]:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    key = "question" if "question" in row else "prompt"
    if key not in row:
        raise ValueError(f"{where}: the row needs a 'question' (or 'prompt') string")
    images = row.get("images", [])
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise ValueError(f"{where}: 'images' must be a list of paths or URLs")
    return _text_field(row, key, where), tuple(images), str(row.get("id", ""))


def pair_row_from_dict(row: Any, where: str) -> PairRow:
    question, images, row_id = _common(row, where)
    return PairRow(
        question, _text_field(row, "chosen", where), _text_field(row, "rejected", where), images, row_id
    )


def point_row_from_dict(row: Any, where: str) -> PointRow:
    question, images, row_id = _common(row, where)
    label = row.get("label")
    labels = {"yes": "Yes", "no": "No", True: "Yes", False: "No"}
    norm = labels.get(label.strip().lower() if isinstance(label, str) else label)
    if norm is None:
        raise ValueError(f'{where}: \'label\' must be "Yes"/"No" (or true/false), got {label!r}')
    return PointRow(question, _text_field(row, "response", where), norm, images, row_id)


def _load_jsonl(path: str | Path, parse: Any) -> list:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"reward benchmark file '{p}' does not exist")
    rows = []
    for n, line in enumerate(p.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{n}: not valid JSON ({e.msg})") from e
        rows.append(parse(data, f"{p}:{n}"))
    return rows


def load_pair_rows(path: str | Path) -> list[PairRow]:
    return _load_jsonl(path, pair_row_from_dict)


def load_point_rows(path: str | Path) -> list[PointRow]:
    return _load_jsonl(path, point_row_from_dict)


def save_jsonl(rows: Iterable[PairRow | PointRow], path: str | Path) -> None:
    """Writes rows in the format the loaders read."""
    Path(path).write_text("".join(json.dumps(r.to_dict()) + "\n" for r in rows))


def _row_prompt(question: str, images: tuple[str, ...], row_id: str) -> Prompt:
    return Prompt(
        id=row_id or "row", messages=[{"role": "user", "content": question}], answer="", images=list(images)
    )


def _show_pair(first: str, second: str, view: View) -> tuple[str, str, View]:
    """Both texts in one view: "answer" only when both have a boxed answer."""
    (a, va), (b, vb) = show_response(first, view) or ("", "cot"), show_response(second, view) or ("", "cot")
    if va != vb:
        (a, va), (b, vb) = (
            show_response(first, "cot") or ("", "cot"),
            show_response(second, "cot") or ("", "cot"),
        )
    return a, b, va


def pairwise_accuracy(
    engine: RolloutEngine,
    encode: EncodeFn,
    rows: Sequence[PairRow],
    *,
    params: SamplingParams | None = None,
    judge: JudgeFn | None = None,
    view: View = "cot",
    seed: int = 0,
    batch_size: int = 0,
) -> PairwiseResult:
    """Greedy pairwise judgements of every row in both orders (2 * len(rows) generations)."""
    judge = judge or default_judge()
    prompts: list[Prompt] = []
    for n, row in enumerate(rows):
        template = pick_template("pairwise", random.Random(f"reward-bench:{seed}:{n}"))
        source = _row_prompt(row.question, row.images, row.id or f"pair{n}")
        chosen, rejected, used = _show_pair(row.chosen, row.rejected, view)
        for suffix, a, b in (("chosen-A", chosen, rejected), ("chosen-B", rejected, chosen)):
            prompts.append(
                user_prompt(source, suffix, render_pairwise(template, row.question, a, b, used), "judge")
            )
    outs = generate_texts(engine, encode, prompts, greedy_params(params), batch_size)
    verdicts = [parse_verdict(o, ("A", "B"), judge) for o in outs]
    pairs = list(zip(verdicts[0::2], verdicts[1::2], strict=True))
    right = [(va == "A", vb == "B") for va, vb in pairs]
    parsed = [v for v in verdicts if v is not None]
    n_rows = len(rows)
    return PairwiseResult(
        accuracy=sum(a + b for a, b in right) / (2 * n_rows) if n_rows else 0.0,
        pair_accuracy=sum(a and b for a, b in right) / n_rows if n_rows else 0.0,
        a_rate=sum(v == "A" for v in parsed) / len(parsed) if parsed else 0.0,
        unparsable_rate=(len(verdicts) - len(parsed)) / len(verdicts) if verdicts else 0.0,
        num_rows=n_rows,
        verdicts=pairs,
    )


def pointwise_accuracy(
    engine: RolloutEngine,
    encode: EncodeFn,
    rows: Sequence[PointRow],
    *,
    params: SamplingParams | None = None,
    judge: JudgeFn | None = None,
    view: View = "cot",
    seed: int = 0,
    batch_size: int = 0,
) -> PointwiseResult:
    """Greedy Yes/No judgements of every row (one generation per row)."""
    judge = judge or default_judge()
    prompts: list[Prompt] = []
    for n, row in enumerate(rows):
        template = pick_template("pointwise", random.Random(f"reward-bench:{seed}:{n}"))
        source = _row_prompt(row.question, row.images, row.id or f"point{n}")
        shown, used = show_response(row.response, view) or (row.response, "cot")
        prompts.append(
            user_prompt(source, "point", render_pointwise(template, row.question, shown, used), "judge")
        )
    outs = generate_texts(engine, encode, prompts, greedy_params(params), batch_size)
    verdicts = [parse_verdict(o, ("Yes", "No"), judge) for o in outs]

    def acc(label: str | None) -> float | None:
        hits = [
            v == r.label for v, r in zip(verdicts, rows, strict=True) if label is None or r.label == label
        ]
        return sum(hits) / len(hits) if hits else None

    return PointwiseResult(
        accuracy=acc(None) or 0.0,
        accuracy_yes=acc("Yes"),
        accuracy_no=acc("No"),
        unparsable_rate=sum(v is None for v in verdicts) / len(verdicts) if verdicts else 0.0,
        num_rows=len(rows),
        verdicts=verdicts,
    )


def heldout_from_triples(triples: Iterable[tuple[Prompt | str, str, str]]) -> HeldOut:
    """(prompt or question, right response, wrong response) -> one pair row and two point rows
    (the right response labelled Yes, the wrong one No) each."""
    out = HeldOut()
    for n, (prompt, right, wrong) in enumerate(triples):
        where = f"triples[{n}]"
        question = question_text(prompt) if isinstance(prompt, Prompt) else prompt
        images = tuple(prompt.images) if isinstance(prompt, Prompt) else ()
        row_id = prompt.id if isinstance(prompt, Prompt) else f"triple{n}"
        for name, value in (("question", question), ("right response", right), ("wrong response", wrong)):
            if not isinstance(value, str) or not strip_special_tokens(value):
                raise ValueError(f"{where}: the {name} must be a non-empty string")
        out.pairs.append(PairRow(question, right, wrong, images, row_id))
        out.points += [
            PointRow(question, right, "Yes", images, row_id),
            PointRow(question, wrong, "No", images, row_id),
        ]
    return out


def heldout_from_groups(groups: Iterable[RolloutGroup], *, seed: int = 0, max_rows: int = 0) -> HeldOut:
    """From verified groups that hold a right and a wrong non-empty response: one of each,
    chosen by a seeded RNG, as in `heldout_from_triples`. `max_rows` > 0 keeps the first ones."""
    triples: list[tuple[Prompt, str, str]] = []
    for n, group in enumerate(groups):
        texts = [
            (r.correct, r.completion.text) for r in group.rollouts if strip_special_tokens(r.completion.text)
        ]
        right = [t for ok, t in texts if ok]
        wrong = [t for ok, t in texts if not ok]
        if right and wrong:
            rng = random.Random(f"heldout:{seed}:{n}:{group.prompt.id}")
            triples.append((group.prompt, right[rng.randrange(len(right))], wrong[rng.randrange(len(wrong))]))
        if max_rows and len(triples) >= max_rows:
            break
    return heldout_from_triples(triples)
