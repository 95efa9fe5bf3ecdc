"""Self-reflection and reward-benchmark accuracy against a scripted engine."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

import spark_mcore.rewards as rewards
from spark_mcore.eval.reward_bench import (
    PairRow,
    PointRow,
    heldout_from_groups,
    heldout_from_triples,
    load_pair_rows,
    load_point_rows,
    pairwise_accuracy,
    pointwise_accuracy,
    save_jsonl,
)
from spark_mcore.eval.self_reflect import self_reflect
from spark_mcore.rollout.base import SamplingParams
from spark_mcore.types import Completion, Prompt, Rollout, RolloutGroup

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def _standin_extract_boxed(text: str) -> str | None:
    found = _BOXED.findall(text)
    return found[-1] if found else None


def _standin_judge(response: str, label: str) -> float:
    found = re.findall(r"\\box(?:ed)?\{([^{}]*)\}", response)
    return float(bool(found) and found[-1].strip().lower() == label.lower())


@pytest.fixture(autouse=True)
def _extract_boxed(monkeypatch: pytest.MonkeyPatch) -> None:
    if not hasattr(rewards, "extract_boxed"):
        monkeypatch.setattr(rewards, "extract_boxed", _standin_extract_boxed, raising=False)


@pytest.fixture
def judge() -> Callable[[str, str], float]:
    """The registered judge verifier when spark_mcore.rewards has it, else a stand-in."""
    try:
        from spark_mcore.rewards import get_verifier

        return get_verifier("judge")
    except ImportError:
        return _standin_judge


class ScriptedEngine:
    """Answers each prompt text with `script(text)`; records every generate() call."""

    policy_version = 0

    def __init__(self, script: Callable[[str], str]) -> None:
        self.script = script
        self.texts: list[str] = []
        self.calls: list[tuple[int, SamplingParams]] = []

    def encode(self, prompt: Prompt) -> list[int]:
        self.texts.append(prompt.messages[-1]["content"])
        return [len(self.texts) - 1]

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        self.calls.append((len(prompt_ids), params))
        return [[Completion(token_ids=[0], text=self.script(self.texts[ids[0]]))] for ids in prompt_ids]

    def update_weights(self, named_tensors: object, version: int) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        pass


def q(pid: str, question: str, answer: str) -> Prompt:
    return Prompt(id=pid, messages=[{"role": "user", "content": question}], answer=answer)


QUESTIONS = {
    "What is 2+3?": "5",
    "What is 4+4?": "8",
    "What is 1+1?": "2",
    "What is 1+2?": "3",
    "What is 3+3?": "6",
}
SOLVE = {
    "What is 2+3?": "2+3=6 so \\boxed{6}",
    "What is 4+4?": "\\boxed{8}",
    "What is 1+1?": "\\boxed{2}",
    "What is 1+2?": "\\boxed{7}",
    "What is 3+3?": "\\boxed{5}",
}
# (question, answer shown to the judge) -> judge output
JUDGE = {
    ("What is 2+3?", "6"): "\\boxed{No}",
    ("What is 2+3?", "5"): "\\boxed{Yes}",
    ("What is 4+4?", "8"): "It looks off. \\boxed{No}",
    ("What is 4+4?", "9"): "\\boxed{No}",
    ("What is 1+1?", "2"): "\\boxed{Yes}",
    ("What is 1+2?", "7"): "Looks fine. \\boxed{Yes}",
    ("What is 3+3?", "5"): "hmm, not sure",
    ("What is 3+3?", "6"): "\\boxed{Yes}",
}
# (question, answer of the attempt being revised) -> revision
REVISE = {
    ("What is 2+3?", "6"): "2+3=5 \\boxed{5}",
    ("What is 4+4?", "8"): "\\boxed{9}",
    ("What is 4+4?", "9"): "4+4=8 \\boxed{8}",
    ("What is 3+3?", "5"): "\\boxed{6}",
}


def reflect_script(text: str) -> str:
    if text in SOLVE:
        return SOLVE[text] + "<|im_end|>"
    question = next(k for k in QUESTIONS if k in text)
    shown = [b for b in _BOXED.findall(text) if b not in ("Yes", "No", "")]
    assert len(shown) == 1, text
    table = JUDGE if "\\boxed{Yes}" in text else REVISE
    return table[(question, shown[-1])]


def score(prompt: Prompt, response: str) -> float:
    return float(_standin_extract_boxed(response) == prompt.answer)


def test_self_reflect_two_rounds(judge: Callable[[str, str], float]) -> None:
    prompts = [q(f"p{i}", text, ans) for i, (text, ans) in enumerate(QUESTIONS.items())]
    engine = ScriptedEngine(reflect_script)
    res = self_reflect(
        engine,
        engine.encode,
        prompts,
        rounds=2,
        score=score,
        judge=judge,
        params=SamplingParams(n=4, max_new_tokens=99, stop_token_ids=[7]),
    )
    assert [c[0] for c in engine.calls] == [5, 5, 3, 3, 1]  # solve, judge, revise, judge, revise
    assert all(
        p.n == 1 and p.temperature == 0.0 and p.max_new_tokens == 99 and p.stop_token_ids == [7]
        for _, p in engine.calls
    )
    assert [_standin_extract_boxed(r) for r in res.responses] == ["5", "8", "2", "7", "6"]
    assert res.verdicts == [["No", "Yes"], ["No", "No"], ["Yes"], ["Yes"], [None, "Yes"]]
    assert res.rounds_used == [1, 2, 0, 0, 1]
    assert res.rounds_histogram == {0: 2, 1: 2, 2: 1}
    assert (res.accuracy_before, res.accuracy_after) == (0.4, 0.8)
    # judged right: 8 (No), 2, 5, 6 -> 1/4 rejected; judged wrong: 6 (No), 7 (Yes), 5 (?), 9 (No) -> 3/4
    assert (res.reject_rate_on_right, res.reject_rate_on_wrong) == (0.25, 0.75)
    assert res.unparsable_rate == 1 / 8
    assert res.summary()["self_reflect/accuracy_after"] == 0.8
    revisions = [t for t in engine.texts if "\\boxed{}" in t]
    assert revisions and all("<|im_end|>" not in t for t in engine.texts)
    # revision prompts are the templates that state the attempt is wrong
    assert all(any(w in t for w in ("is incorrect", "wrong result", "A wrong")) for t in revisions)


def test_self_reflect_one_round_accepts_last_revision(judge: Callable[[str, str], float]) -> None:
    prompts = [q("a", "What is 4+4?", "8"), q("b", "What is 1+1?", "2")]
    engine = ScriptedEngine(reflect_script)
    res = self_reflect(engine, engine.encode, prompts, rounds=1, score=score, judge=judge)
    assert [_standin_extract_boxed(r) for r in res.responses] == ["9", "2"]  # a right answer wrongly rejected
    assert (res.accuracy_before, res.accuracy_after, res.reject_rate_on_right, res.reject_rate_on_wrong) == (
        1.0,
        0.5,
        0.5,
        None,
    )
    zero = self_reflect(
        ScriptedEngine(reflect_script), ScriptedEngine(reflect_script).encode, [], rounds=0, judge=judge
    )
    assert zero.responses == [] and zero.accuracy_before is None


def test_self_reflect_rejects_bad_arguments(judge: Callable[[str, str], float]) -> None:
    engine = ScriptedEngine(reflect_script)
    with pytest.raises(ValueError, match="rounds"):
        self_reflect(engine, engine.encode, [], rounds=-1, judge=judge)

    class Broken(ScriptedEngine):
        def generate(self, prompt_ids, params):  # type: ignore[no-untyped-def]
            return []

    broken = Broken(reflect_script)
    with pytest.raises(RuntimeError, match="one non-empty list per prompt"):
        self_reflect(broken, broken.encode, [q("a", "What is 1+1?", "2")], judge=judge)


# ---------------------------------------------------------------- reward bench

PAIRS = [
    PairRow("What is 6*7?", "6*7 = 42, so \\boxed{42}", "6*7 = 48, so \\boxed{48}", id="r0"),
    PairRow("What is 9-4?", "9-4 = 5, \\boxed{5}", "9-4 = 3, \\boxed{3}", id="r1"),
    PairRow("What is 2^5?", "2^5 = 32 \\boxed{32}", "2^5 = 10 \\boxed{10}", id="r2"),
]
CHOSEN = {r.chosen for r in PAIRS}


def oracle_letter(text: str) -> str:
    """The letter of the chosen response (A is always shown before B)."""
    where = {t: text.index(t) for t in CHOSEN | {r.rejected for r in PAIRS} if t in text}
    first = min(where, key=where.get)  # type: ignore[arg-type]
    return "A" if first in CHOSEN else "B"


def test_pairwise_accuracy_in_both_orders(judge: Callable[[str, str], float]) -> None:
    engine = ScriptedEngine(lambda t: f"\\boxed{{{oracle_letter(t)}}}")
    res = pairwise_accuracy(engine, engine.encode, PAIRS, judge=judge)
    assert (res.accuracy, res.pair_accuracy, res.a_rate, res.unparsable_rate, res.num_rows) == (
        1.0,
        1.0,
        0.5,
        0.0,
        3,
    )
    assert res.verdicts == [("A", "B")] * 3 and [c[0] for c in engine.calls] == [6]

    always_a = ScriptedEngine(lambda t: "\\boxed{A}")  # pure position bias scores 50 %, never 100 %
    res = pairwise_accuracy(always_a, always_a.encode, PAIRS, judge=judge, batch_size=4)
    assert (res.accuracy, res.pair_accuracy, res.a_rate) == (0.5, 0.0, 1.0)
    assert [c[0] for c in always_a.calls] == [4, 2]

    def mixed(t: str) -> str:
        if "9-4" in t:
            return "\\boxed{A}"
        return "no idea" if "2^5" in t else f"\\boxed{{{oracle_letter(t)}}}"

    m = ScriptedEngine(mixed)
    res = pairwise_accuracy(m, m.encode, PAIRS, judge=judge)
    assert (res.accuracy, res.pair_accuracy, res.a_rate, res.unparsable_rate) == (
        0.5,
        pytest.approx(1 / 3),
        0.75,
        pytest.approx(1 / 3),
    )


def test_pairwise_answer_view_shows_final_answers_only(judge: Callable[[str, str], float]) -> None:
    engine = ScriptedEngine(lambda t: "\\boxed{A}")
    pairwise_accuracy(engine, engine.encode, PAIRS[:1], judge=judge, view="answer")
    assert all("42" in t and "48" in t and "6*7 =" not in t for t in engine.texts)


def test_pointwise_accuracy(judge: Callable[[str, str], float]) -> None:
    rows = [
        PointRow("What is 1+1?", "\\boxed{2}", "Yes"),
        PointRow("What is 1+1?", "\\boxed{3}", "No"),
        PointRow("What is 2+2?", "\\boxed{4}", "Yes"),
    ]
    yes = ScriptedEngine(lambda t: "\\boxed{Yes}")
    res = pointwise_accuracy(yes, yes.encode, rows, judge=judge)
    assert (res.accuracy, res.accuracy_yes, res.accuracy_no, res.unparsable_rate) == (
        pytest.approx(2 / 3),
        1.0,
        0.0,
        0.0,
    )
    good = ScriptedEngine(lambda t: "\\boxed{No}" if "\\boxed{3}" in t else "\\boxed{Yes}")
    assert pointwise_accuracy(good, good.encode, rows, judge=judge).accuracy == 1.0


def test_jsonl_rows_validated_with_line_numbers(tmp_path: Path) -> None:
    good = tmp_path / "pairs.jsonl"
    good.write_text(
        json.dumps({"prompt": "Q?", "chosen": "a", "rejected": "b", "images": ["i.png"]})
        + "\n\n"
        + json.dumps({"question": "Q2", "chosen": "c", "rejected": "d"})
        + "\n"
    )
    assert load_pair_rows(good) == [PairRow("Q?", "a", "b", ("i.png",)), PairRow("Q2", "c", "d")]
    bad = tmp_path / "bad.jsonl"
    for content, msg in [
        ('{"prompt": "Q", "chosen": "a", "rejected": "b"}\n{oops\n', r"bad.jsonl:2: not valid JSON"),
        ('{"prompt": "Q", "chosen": "a"}\n', r"bad.jsonl:1: 'rejected' must be a non-empty string"),
        ('{"chosen": "a", "rejected": "b"}\n', r":1: the row needs a 'question'"),
        ("[1, 2]\n", r":1: a row must be a JSON object"),
    ]:
        bad.write_text(content)
        with pytest.raises(ValueError, match=msg):
            load_pair_rows(bad)
    points = tmp_path / "points.jsonl"
    points.write_text(
        '{"question": "Q", "response": "r", "label": "yes"}\n{"question": "Q", "response": "r", "label": false}\n'
    )
    assert [r.label for r in load_point_rows(points)] == ["Yes", "No"]
    points.write_text('{"question": "Q", "response": "r", "label": "maybe"}\n')
    with pytest.raises(ValueError, match=r"points.jsonl:1: 'label'"):
        load_point_rows(points)
    with pytest.raises(ValueError, match="does not exist"):
        load_pair_rows(tmp_path / "missing.jsonl")


def test_heldout_builders_round_trip(tmp_path: Path) -> None:
    def grp(pid: str, texts: list[str], correct: list[bool]) -> RolloutGroup:
        p = q(pid, f"Question {pid}", "1")
        return RolloutGroup(
            p, [Rollout(p, [0], Completion([0], t), float(c)) for t, c in zip(texts, correct, strict=True)]
        )

    groups = [
        grp("a", ["\\boxed{1}", "\\boxed{2}"], [True, False]),
        grp("b", ["\\boxed{1}"] * 2, [True, True]),
        grp("c", ["", "\\boxed{1}", "\\boxed{5}"], [False, True, False]),
    ]
    held = heldout_from_groups(groups, seed=3)
    assert [(r.id, r.chosen, r.rejected) for r in held.pairs] == [
        ("a", "\\boxed{1}", "\\boxed{2}"),
        ("c", "\\boxed{1}", "\\boxed{5}"),
    ]
    assert [(r.id, r.label) for r in held.points] == [("a", "Yes"), ("a", "No"), ("c", "Yes"), ("c", "No")]
    assert len(heldout_from_groups(groups, max_rows=1).pairs) == 1
    save_jsonl(held.pairs, tmp_path / "h.jsonl")
    save_jsonl(held.points, tmp_path / "p.jsonl")
    assert load_pair_rows(tmp_path / "h.jsonl") == held.pairs
    assert load_point_rows(tmp_path / "p.jsonl") == held.points
    trip = heldout_from_triples([("What?", "\\boxed{1}", "\\boxed{2}")])
    assert trip.pairs == [PairRow("What?", "\\boxed{1}", "\\boxed{2}", id="triple0")]
    with pytest.raises(ValueError, match=r"triples\[0\]: the wrong response"):
        heldout_from_triples([("What?", "\\boxed{1}", "<|im_end|>")])
