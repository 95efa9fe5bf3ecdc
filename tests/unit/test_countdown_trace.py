"""The written check of a countdown response (spark_mcore.rewards.countdown_trace)."""

from __future__ import annotations

import json
import random
from fractions import Fraction

import pytest

from spark_mcore.data.countdown import countdown_problems, right_solution, worked_solution, wrong_solution
from spark_mcore.rewards.countdown import countdown_verifier
from spark_mcore.rewards.countdown_trace import check_trace, compare_text, pairwise_trace, upgrade_check
from spark_mcore.spark.own_judge import load_rows, own_judge_rows, save_rows
from spark_mcore.types import Completion, Prompt, Rollout, RolloutGroup

ANS = '{"numbers": [6, 7, 9], "target": 15}'


@pytest.mark.parametrize(("response", "trace"), [
    ("6+9=15. \\boxed{6+9}", "6+9=15. uses 6 9; given 6 7 9. 15 vs 15: 1 vs 1, 5 vs 5, same. \\boxed{Yes}"),
    ("7/7=1, no. 7+7=14. \\boxed{7+7}", "7+7=14. uses 7 7; given 6 7 9. 7 used twice. 14 vs 15: 1 vs 1, 4 vs 5, differ. \\boxed{No}"),
    ("\\boxed{(9-4)*5}", "9-4=5. 5*5=25. uses 9 4 5; given 6 7 9. 4 not given. 5 not given. 25 vs 15: 2 vs 1, differ. \\boxed{No}"),
    ("\\boxed{8+7}", "8+7=15. uses 8 7; given 6 7 9. 8 not given. 15 vs 15: 1 vs 1, 5 vs 5, same. \\boxed{No}"),
    ("\\boxed{9+6}", "9+6=15. uses 9 6; given 6 7 9. 15 vs 15: 1 vs 1, 5 vs 5, same. \\boxed{Yes}"),
    ("\\boxed{9*7/6}", "9*7=63. 63/6=21/2. uses 9 7 6; given 6 7 9. 21/2 vs 15: not whole, differ. \\boxed{No}"),
    ("\\boxed{9-7*6}", "7*6=42. 9-42=-33. uses 9 7 6; given 6 7 9. -33 vs 15: negative, differ. \\boxed{No}"),
    ("\\boxed{15}", "uses 15; given 6 7 9. 15 not given. 15 vs 15: 1 vs 1, 5 vs 5, same. \\boxed{No}"),
    ("\\boxed{9/(7-7)}", "7-7=0. 9/0 divides by zero. \\boxed{No}"),
    ("6+9=15.", "no box. \\boxed{No}"),
    ("\\boxed{6+}", "cannot read the box. \\boxed{No}"),
    ("\\boxed{__import__('os')}", "cannot read the box. \\boxed{No}"),
    ("\\boxed{6+7+9+9}", "uses 4 numbers; given 3. \\boxed{No}"),
])
def test_hand_written_traces(response: str, trace: str) -> None:
    assert check_trace(response, ANS) == trace
    assert trace.endswith("\\boxed{Yes}") == (countdown_verifier(response, ANS) == 1.0)


@pytest.mark.parametrize(("value", "target", "text"), [
    (Fraction(27), 18, "27 vs 18: 2 vs 1, differ."),  # decided at the first digit pair that differs
    (Fraction(25), 28, "25 vs 28: 2 vs 2, 5 vs 8, differ."),
    (Fraction(18), 18, "18 vs 18: 1 vs 1, 8 vs 8, same."),
    (Fraction(5), 5, "5 vs 5: 5 vs 5, same."),
    (Fraction(0), 7, "0 vs 7: 0 vs 7, differ."),
    (Fraction(127), 18, "127 vs 18: 3 digits vs 2, differ."),
    (Fraction(7, 2), 18, "7/2 vs 18: not whole, differ."),
    (Fraction(-3), 18, "-3 vs 18: negative, differ."),
])
def test_compare_text_decides_digit_by_digit(value: Fraction, target: int, text: str) -> None:
    assert compare_text(value, target) == text
    assert text.endswith("same.") == (value == target)


def test_upgrade_check_rewrites_only_the_old_comparison() -> None:
    old = "A: 9*3=27. uses 9 3; given 9 3 2. 27 vs 18: same. B: 21/2 vs 15: differ. -33 vs 15: differ. \\boxed{A}"
    new = upgrade_check(old)
    assert new == ("A: 9*3=27. uses 9 3; given 9 3 2. 27 vs 18: 2 vs 1, differ. B: 21/2 vs 15: not whole, differ. "
                   "-33 vs 15: negative, differ. \\boxed{A}")  # the comparison is recomputed, not copied
    assert upgrade_check(new) == new
    assert upgrade_check(check_trace("\\boxed{6+9}", ANS)) == check_trace("\\boxed{6+9}", ANS)


def test_three_uses_and_a_malformed_reference() -> None:
    assert "7 used 3 times." in check_trace("\\boxed{7+7+7}", '{"numbers": [7, 1, 2], "target": 21}')
    assert check_trace("\\boxed{1+2}", "not json") == "no problem to check. \\boxed{No}"


def test_pairwise_trace_checks_both_and_boxes_the_right_one() -> None:
    right, wrong = "6+9=15. \\boxed{6+9}", "\\boxed{7+7}"
    assert pairwise_trace(right, wrong, ANS) == (
        "A: 6+9=15. uses 6 9; given 6 7 9. 15 vs 15: 1 vs 1, 5 vs 5, same. B: 7+7=14. uses 7 7; given 6 7 9. 7 used twice. "
        "14 vs 15: 1 vs 1, 4 vs 5, differ. \\boxed{A}")
    assert pairwise_trace(wrong, right, ANS).endswith("\\boxed{B}")


def _responses(rng: random.Random, prompt: Prompt) -> list[str]:
    numbers = json.loads(prompt.answer)["numbers"]
    pieces = [str(n) for n in numbers] + ["1", "2", "10", "0", "+", "-", "*", "/", "(", ")", "×", "÷", " ", "x"]
    noise = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 9))) for _ in range(6)]
    return ([worked_solution(prompt), right_solution(prompt), *(wrong_solution(prompt, rng)[0] for _ in range(3))]
            + [f"\\boxed{{{t}}}" for t in noise])


def test_the_verdict_agrees_with_the_verifier_on_many_responses() -> None:
    rng = random.Random(0)
    prompts = countdown_problems([1, 3], "train", 40, 0)
    seen = {"Yes": 0, "No": 0}
    for p in prompts:
        for r in _responses(rng, p):
            verdict = "Yes" if check_trace(r, p.answer).endswith("\\boxed{Yes}") else "No"
            assert (verdict == "Yes") == (countdown_verifier(r, p.answer) == 1.0), (r, p.answer)
            seen[verdict] += 1
    assert seen["Yes"] >= 60 and seen["No"] >= 200
    huge = "\\boxed{" + "(" * 10_000 + "1" + ")" * 10_000 + "}"
    assert check_trace(huge, ANS) == "cannot read the box. \\boxed{No}"  # the verifier's length cap


def _group(texts: list[str], correct: list[bool], task: str = "countdown") -> RolloutGroup:
    p = Prompt(id="p0", messages=[{"role": "user", "content": "Numbers: 6 7 9. Target: 15."}], answer=ANS, task=task)
    return RolloutGroup(p, [Rollout(p, [0], Completion([0], t), float(c)) for t, c in zip(texts, correct, strict=True)])


def test_own_judge_rows_with_rationale_write_the_check_and_round_trip(tmp_path) -> None:
    right, wrong = "6+9=15. \\boxed{6+9}", "7+7=14. \\boxed{7+7}"
    rows = own_judge_rows([_group([right, wrong], [True, False])], content_mode="cot", rationale=True)
    targets = {r.label: r.target for r in rows}
    assert targets["Yes"] == check_trace(right, ANS) and targets["No"] == check_trace(wrong, ANS)
    assert targets["A"] == pairwise_trace(right, wrong, ANS) and targets["B"] == pairwise_trace(wrong, right, ANS)
    path = tmp_path / "own.jsonl"
    save_rows(rows, path)
    assert load_rows(path) == rows
    bare = own_judge_rows([_group([right, wrong], [True, False])], content_mode="cot")
    assert {r.target for r in bare} == {"\\boxed{Yes}", "\\boxed{No}", "\\boxed{A}", "\\boxed{B}"}
    # a label the check disagrees with (a verifier timeout) keeps the bare verdict
    odd = own_judge_rows([_group([wrong, right], [True, False])], content_mode="cot", rationale=True)
    assert {r.target for r in odd if r.kind == "pointwise"} == {"\\boxed{Yes}", "\\boxed{No}"}
    with pytest.raises(ValueError, match="no written check"):
        own_judge_rows([_group([right, wrong], [True, False], task="arith")], rationale=True)
