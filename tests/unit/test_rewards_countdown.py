"""The `countdown` verifier: every rule of the built-in countdown task, each in bounded time."""

from __future__ import annotations

import json
import time

import pytest

from spark_mcore.rewards import get_verifier, registered_verifiers
from spark_mcore.rewards.countdown import MAX_DEPTH, MAX_EXPR_CHARS

ANSWER = json.dumps({"numbers": [3, 7, 5, 5], "target": 26})
V = get_verifier("countdown")
LIMIT_S = 0.5  # CPU seconds per call; the worst cases below take well under a millisecond


def score(response: str, answer: str = ANSWER) -> float:
    start = time.process_time()
    value = V(response, answer)
    assert time.process_time() - start < LIMIT_S, response[:60]
    assert type(value) is float
    return value


def boxed(expr: str) -> str:
    return f"some steps first. \\boxed{{{expr}}}"


def test_registered() -> None:
    assert "countdown" in registered_verifiers()


@pytest.mark.parametrize("expr", [
    "3*7+5", "7*3+5", "(3*7)+5", " 5 + 7 * 3 ", "3×7+5", "3 \\times 7 + 5", "3\\cdot 7+5",
    "((3)*(7))+(5)", "5+3*7", "(7*3)+5",
])
def test_valid_expressions_reach_the_target(expr: str) -> None:
    assert score(boxed(expr)) == 1.0


def test_only_the_last_box_counts() -> None:
    assert score("\\boxed{3+7} then \\boxed{3*7+5}") == 1.0
    assert score("\\boxed{3*7+5} then \\boxed{3+7}") == 0.0


def test_non_integer_intermediate_values_that_reach_the_target() -> None:
    answer = json.dumps({"numbers": [1, 3, 3, 1], "target": 4})
    assert score(boxed("(1+1/3)*3"), answer) == 1.0  # 4/3 on the way
    assert score(boxed("3÷(1-3÷1+3)"), json.dumps({"numbers": [3, 1, 3, 1, 3], "target": 3})) == 1.0
    assert score(boxed("7/3*3"), json.dumps({"numbers": [7, 3, 3], "target": 7})) == 1.0


@pytest.mark.parametrize("expr", [
    "3*7+5+5+5",        # a 5 used three times, two given
    "7*7-3*5-5-3",      # 7 reused
    "3*7+7-2",          # 2 not given, 7 reused
    "4*6+2",            # foreign numbers that reach the target
    "26",               # the target itself is not a given number
    "3*7+6-1",
])
def test_reused_or_foreign_numbers_score_zero(expr: str) -> None:
    assert score(boxed(expr)) == 0.0


def test_multiset_allows_a_number_given_twice_but_not_thrice() -> None:
    answer = json.dumps({"numbers": [5, 1, 5], "target": 26})
    assert score(boxed("5*5+1"), answer) == 1.0
    assert score(boxed("5*5+5/5"), answer) == 0.0
    assert score(boxed("5*5+1"), json.dumps({"numbers": [5, 1], "target": 26})) == 0.0


@pytest.mark.parametrize("expr", [
    "3/(7-7)+26", "5/(5-5)", "(3*7+5)/0", "3*7+5+5/(3-3)",
])
def test_division_by_zero_scores_zero(expr: str) -> None:
    answer = json.dumps({"numbers": [3, 7, 7, 5, 5, 0, 26], "target": 26})
    assert score(boxed(expr), answer) == 0.0


@pytest.mark.parametrize("expr", [
    "3**7", "3^7", "3 7 + 5", "-3+7*5-5+3", "3*7+5=26", "x", "3*7+5;", "3*(7+5", "3*7)+5", "()",
    "", "3*7++5", "3.0*7+5", "3,7", "2⁶", "٣*7+5", "3*７+5", "\\frac{3}{7}", "3 \\timesx 7",
    "$3*7+5$", "abs(3)",
])
def test_unknown_symbols_and_bad_syntax_score_zero(expr: str) -> None:
    assert score(boxed(expr)) == 0.0


@pytest.mark.parametrize("expr", [
    "__import__('os').system('echo pwned')",
    "__import__(\"os\")",
    "eval('3*7+5')",
    "(lambda: 26)()",
    "[3*7+5][0]",
    "3*7+5 if True else 0",
    "exec('import os')",
    "\\x33*7+5",
])
def test_code_injection_attempts_score_zero(expr: str) -> None:
    assert score(boxed(expr)) == 0.0


def test_missing_or_unclosed_box_scores_zero() -> None:
    assert score("3*7+5") == 0.0
    assert score("\\boxed{3*7+5") == 0.0
    assert score("") == 0.0


def test_huge_inputs_are_answered_in_bounded_time() -> None:
    many = json.dumps({"numbers": [1] * 16, "target": 16})
    assert score(boxed("+".join(["1"] * 16)), many) == 1.0
    assert score(boxed("+".join(["1"] * 10**5)), many) == 0.0            # far past the length cap
    assert score(boxed("(" * 10**5 + "1" + ")" * 10**5), many) == 0.0  # nesting
    assert score(boxed("(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1)), many) == 0.0
    assert score(boxed("(" * MAX_DEPTH + "1" + ")" * MAX_DEPTH), json.dumps({"numbers": [1], "target": 1})) == 1.0
    assert score(boxed("9" * 10**5)) == 0.0                              # one huge literal
    assert score(boxed("999999*999999*999999"), json.dumps({"numbers": [999999] * 3, "target": 1})) == 0.0
    assert score(boxed(" " * (MAX_EXPR_CHARS + 1) + "3")) == 0.0
    assert score("x" * 10**6 + boxed("3*7+5")) == 1.0                    # long prose before the box
    assert score("\\boxed{" * 10**5) == 0.0


@pytest.mark.parametrize("answer", [
    "", "26", "not json", "[]", json.dumps({"numbers": [3], "target": "26"}), json.dumps({"numbers": "3 7", "target": 2}),
    json.dumps({"numbers": [], "target": 1}), json.dumps({"numbers": [3.5], "target": 1}),
    json.dumps({"numbers": [True, 2], "target": 1}), json.dumps({"numbers": [1] * 100, "target": 1}),
    json.dumps({"numbers": [10**30], "target": 1}), "{" * 10**5,
])
def test_malformed_reference_answers_score_zero(answer: str) -> None:
    assert score(boxed("3*7+5"), answer) == 0.0


@pytest.mark.parametrize("response,answer", [(None, ANSWER), (b"\\boxed{3*7+5}", ANSWER), (boxed("3*7+5"), None),
                                             (123, 456), (boxed("3*7+5"), {"numbers": [3, 7, 5], "target": 26})])
def test_non_strings_score_zero(response: object, answer: object) -> None:
    assert V(response, answer) == 0.0  # type: ignore[arg-type]
