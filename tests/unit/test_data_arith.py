"""The builtin arith task: determinism, disjoint splits, correct answers, worked solutions."""

from __future__ import annotations

import logging
import re
import statistics

import pytest

from spark_mcore.data.arith import (
    INSTRUCTION,
    arith_problems,
    available_levels,
    level_pool,
    solve,
    split_of,
    worked_solution,
)
from spark_mcore.data.chat import encode_prompt, encode_response
from spark_mcore.data.tokenizer import build_tokenizer
from spark_mcore.types import Prompt

ALL = [1, 2, 3, 4]
_EXPR = re.compile(r"^(\d+(?:[+*-]\d+)+)=\?\n")


def _expr(p: Prompt) -> str:
    m = _EXPR.match(p.messages[0]["content"])
    assert m, p.messages[0]["content"]
    return m.group(1)


def _eval(expr: str) -> int:
    assert re.fullmatch(r"[\d+*-]+", expr)
    return int(eval(expr))  # digits and + - * only (checked above)


def test_levels_registered() -> None:
    assert available_levels() == ALL


def test_deterministic_by_seed() -> None:
    a = arith_problems(ALL, "train", 300, seed=7)
    b = arith_problems(ALL, "train", 300, seed=7)
    c = arith_problems(ALL, "train", 300, seed=8)
    assert [p.to_dict() for p in a] == [p.to_dict() for p in b]
    assert [p.messages for p in a] != [p.messages for p in c]
    # a larger size extends the list without changing its start
    assert [p.to_dict() for p in arith_problems(ALL, "train", 100, seed=7)] == [p.to_dict() for p in a[:100]]


def test_prompt_shape_and_ids() -> None:
    ps = arith_problems([1], "test", 3, seed=0)
    assert [p.id for p in ps] == ["arith-test-000000", "arith-test-000001", "arith-test-000002"]
    for p in ps:
        assert p.task == "math" and p.images == []
        assert len(p.messages) == 1 and p.messages[0]["role"] == "user"
        assert p.messages[0]["content"] == f"{p.meta['expr']}=?\n{INSTRUCTION}"
        assert p.meta["level"] == 1


def test_splits_disjoint_at_2000_500() -> None:
    train = arith_problems(ALL, "train", 2000, seed=0)
    test = arith_problems(ALL, "test", 500, seed=0)
    train_text = {p.messages[0]["content"] for p in train}
    test_text = {p.messages[0]["content"] for p in test}
    assert not train_text & test_text
    assert len(test_text) == 500  # no repeats inside the test split at this size


def test_split_assignment_is_commutation_invariant() -> None:
    # 37+45 and 45+37 share a key, hence a split; whole pools never share an expression
    assert split_of("37+45") == split_of("+".join(sorted(["45", "37"])))
    for lv in ALL:
        train = {p.expr for p in level_pool(lv, "train")}
        test = {p.expr for p in level_pool(lv, "test")}
        assert train and test and not train & test
        for other in ALL:
            if other != lv:  # levels are disjoint too
                assert not (train | test) & {p.expr for s in ("train", "test") for p in level_pool(other, s)}
        mirrored = {"+".join(reversed(e.split("+"))) for e in test if e.count("+") == 1 and "*" not in e}
        assert not mirrored & train
    # sizes of the exhaustive pools (train + test)
    sizes = {lv: len(level_pool(lv, "train")) + len(level_pool(lv, "test")) for lv in ALL}
    assert sizes == {1: 100 * 100 - 90 * 90, 2: 90 * 90 + 90 * 91 // 2, 3: 2 * 8 * 90, 4: sizes[4]}
    assert sizes[4] == 64 * 99 * 2 + sum(b * c for b in range(2, 10) for c in range(2, 10))


def test_answers_correct_and_operand_ranges() -> None:
    for lv in ALL:
        for p in arith_problems([lv], "train", 400, seed=3):
            expr = _expr(p)
            assert p.meta["expr"] == expr and p.answer == str(_eval(expr))
            assert int(p.answer) >= 0
            nums = [int(n) for n in re.split(r"[+*-]", expr)]
            if lv == 1:
                assert "+" in expr and all(0 <= n <= 99 for n in nums) and min(nums) <= 9
            elif lv == 2:
                assert all(10 <= n <= 99 for n in nums)
            elif lv == 3:
                assert "*" in expr and sorted(len(str(n)) for n in nums) == [1, 2] and min(nums) >= 2
            else:
                assert len(nums) == 3 and expr.count("*") == 1


@pytest.mark.parametrize(
    "expr, text",
    [
        ("37+45", "7+5=12, carry 1. 3+4+1=8. \\boxed{82}"),
        ("3+4", "3+4=7. \\boxed{7}"),
        ("5+37", "5+7=12, carry 1. 0+3+1=4. \\boxed{42}"),
        ("67+45", "7+5=12, carry 1. 6+4+1=11. \\boxed{112}"),
        ("52-37", "12-7=5, borrow 1. 5-1-3=1. \\boxed{15}"),
        ("86-54", "6-4=2. 8-5=3. \\boxed{32}"),
        ("52-47", "12-7=5, borrow 1. 5-1-4=0. \\boxed{5}"),
        ("7*38", "8*7=56, carry 5. 3*7+5=26. \\boxed{266}"),
        ("38*7", "8*7=56, carry 5. 3*7+5=26. \\boxed{266}"),
        ("42*2", "2*2=4. 4*2=8. \\boxed{84}"),
        ("35+6*7", "6*7=42. 35+42: 5+2=7. 3+4=7. \\boxed{77}"),
        ("6*7-35", "6*7=42. 42-35: 12-5=7, borrow 1. 4-1-3=0. \\boxed{7}"),
        ("2*3+4", "2*3=6. 6+4: 6+4=10. \\boxed{10}"),
    ],
)
def test_worked_solution_hand_examples(expr: str, text: str) -> None:
    assert solve(expr) == (text, _eval(expr))


def test_every_step_is_true_and_box_matches() -> None:
    eq = re.compile(r"(\d+(?:[+*-]\d+)+)=(\d+)")
    for lv in ALL:
        for p in arith_problems([lv], "test", 300, seed=1):
            sol = worked_solution(p)
            assert sol.endswith(f"\\boxed{{{p.answer}}}") and sol.count("\\boxed") == 1
            steps = eq.findall(sol)
            assert steps
            for lhs, rhs in steps:
                assert _eval(lhs) == int(rhs), (sol, lhs, rhs)


def test_worked_solution_rejects_foreign_prompts() -> None:
    p = Prompt(id="x", messages=[{"role": "user", "content": "2+2=?"}], answer="4")
    with pytest.raises(ValueError, match="meta\\['expr'\\]"):
        worked_solution(p)
    bad = Prompt(id="y", messages=p.messages, answer="5", meta={"expr": "2+2"})
    with pytest.raises(ValueError, match="disagrees"):
        worked_solution(bad)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown arith level 9"):
        arith_problems([9], "train", 1, 0)
    with pytest.raises(ValueError, match="split"):
        arith_problems([1], "val", 1, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="data.levels"):
        arith_problems([], "train", 1, 0)


def test_exhausted_pool_repeats_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    pool = {p.expr for p in level_pool(3, "test")}
    with caplog.at_level(logging.WARNING):
        ps = arith_problems([3], "test", len(pool) + 10, seed=0)
    assert {p.meta["expr"] for p in ps} == pool  # every distinct problem before any repeat
    assert "repeating" in caplog.text


def test_token_lengths_are_small() -> None:
    tok = build_tokenizer()
    report = {}
    for lv in ALL:
        ps = arith_problems([lv], "train", 300, seed=0)
        pl = [len(encode_prompt(tok, p)) for p in ps]
        sl = [len(encode_response(tok, worked_solution(p))) for p in ps]
        report[lv] = (statistics.median(pl), max(pl), statistics.median(sl), max(sl))
        assert max(pl) <= 32 and max(sl) <= 42, report
    print("token lengths per level (prompt median, max, solution median, max):", report)
