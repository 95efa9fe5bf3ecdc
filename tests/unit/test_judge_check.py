"""`judge_check`: judge tasks scored on the verdict and the written check (hand-checked cases),
the countdown check writer registry, and the recycler's `judge_check` / `judge_balance` options."""

from __future__ import annotations

import json
import time

import pytest

from spark_mcore.config.loader import ConfigError
from spark_mcore.rewards import get_verifier
from spark_mcore.rewards.countdown_trace import check_steps
from spark_mcore.rewards.judge_check import (
    CheckWriter,
    check_steps_of,
    get_check_writer,
    judge_check_answer,
    parse_judge_check_answer,
    step_agreement,
    verdict_label,
    written_check,
)
from spark_mcore.spark.config import SparkConfig
from spark_mcore.spark.loop import kind_metrics
from spark_mcore.spark.recycler import Recycler
from spark_mcore.types import Completion, Prompt, Rollout, RolloutGroup

PROBLEM = '{"numbers": [6, 7, 9], "target": 15}'
RIGHT = "6+9=15. \\boxed{6+9}"
WRONG = "7+7=14. \\boxed{7+7}"
# check_steps(WRONG, PROBLEM), written out by hand from the format in countdown_trace
WRONG_CHECK = "7+7=14. uses 7 7; given 6 7 9. 7 used twice. 14 vs 15: 1 vs 1, 4 vs 5, differ."
RIGHT_CHECK = "6+9=15. uses 6 9; given 6 7 9. 15 vs 15: 1 vs 1, 5 vs 5, same."
VERIFY = get_verifier("judge_check")


def test_countdown_check_writer_is_registered_and_typed() -> None:
    writer = get_check_writer("countdown")
    assert isinstance(writer, CheckWriter)
    assert writer(WRONG, PROBLEM) == (WRONG_CHECK, False)
    assert writer(RIGHT, PROBLEM) == (RIGHT_CHECK, True)
    assert get_check_writer("math") is None


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (f"{WRONG_CHECK} \\boxed{{No}}", 1.0),  # right check, right verdict: full credit
        ("\\boxed{No}", 0.5),  # right verdict, no check: 0.5 * 1 + 0.5 * 0
        (f"{WRONG_CHECK} \\boxed{{Yes}}", 0.5),  # right check, wrong verdict
        # 4 reference steps, 4 written, 3 in common (the value line is wrong): LCS 3 -> 2*3/8
        ("7+7=14. uses 7 7; given 6 7 9. 7 used twice. 14 vs 14: same. \\boxed{No}", 0.5 + 0.5 * 0.75),
        # one extra step: LCS 4 of 4 reference + 5 written -> 8/9
        (f"{WRONG_CHECK} So. \\boxed{{No}}", 0.5 + 0.5 * 8 / 9),
        ("7+7=14.   uses 7 7;  given 6 7 9.\n7 used twice. 14 vs 15: 1 vs 1, 4 vs 5, differ. \\boxed{\\text{no}.}", 1.0),
        ("", 0.0),
        (f"{WRONG_CHECK}", 0.5),  # no verdict box: the whole text is the check
    ],
)
def test_pointwise_scores_by_hand(response: str, expected: float) -> None:
    answer = judge_check_answer("No", WRONG_CHECK, 0.5)
    assert VERIFY(response, answer) == pytest.approx(expected)


def test_weight_moves_credit_between_verdict_and_check() -> None:
    assert VERIFY("\\boxed{No}", judge_check_answer("No", WRONG_CHECK, 0.0)) == 1.0
    assert VERIFY("\\boxed{No}", judge_check_answer("No", WRONG_CHECK, 1.0)) == 0.0
    assert VERIFY(f"{WRONG_CHECK} \\boxed{{Yes}}", judge_check_answer("No", WRONG_CHECK, 1.0)) == 1.0
    with pytest.raises(ValueError, match="weight"):
        judge_check_answer("No", WRONG_CHECK, 1.5)


def test_pairwise_reference_and_score() -> None:
    check = f"A: {WRONG_CHECK} B: {RIGHT_CHECK}"
    answer = judge_check_answer("B", check, 0.5)
    assert VERIFY(f"{check} \\boxed{{B}}", answer) == 1.0
    assert VERIFY(f"{check} \\boxed{{A}}", answer) == 0.5
    # 7 reference steps (A: 4, B: 3); written: A's first step and all of B (4 steps), all in
    # the reference in order: LCS 4 -> 0.5 + 0.5 * 2*4/11
    partial = f"A: 7+7=14. B: {RIGHT_CHECK} \\boxed{{B}}"
    assert VERIFY(partial, answer) == pytest.approx(0.5 + 0.5 * 8 / 11)


@pytest.mark.parametrize("answer", ["No", "", "{", '{"label": "No"}', '{"label": 1, "check": "", "weight": 0.5}',
                                    '{"label": "No", "check": "x", "weight": 2}', None, 3, "{" + "x" * 10**6])
def test_malformed_answers_score_zero(answer: object) -> None:
    assert VERIFY("\\boxed{No}", answer) == 0.0  # type: ignore[arg-type]
    assert parse_judge_check_answer(answer) is None


def test_bounded_on_huge_input() -> None:
    answer = judge_check_answer("No", WRONG_CHECK, 0.5)
    huge = "1+1=2. " * 200_000 + "\\boxed{No}" + "\\boxed{" * 10_000
    start = time.process_time()
    value = VERIFY(huge, answer)
    assert 0.0 <= value <= 1.0 and time.process_time() - start < 1.0
    assert len(check_steps_of(huge)) == 64


def test_helpers() -> None:
    assert written_check("a. b. \\boxed{x} c \\box{No}") == "a. b. \\boxed{x} c "
    assert check_steps_of(" 3.5 is. x=1.  y ") == ["3.5 is.", "x=1.", "y"]
    assert step_agreement([], []) == 1.0 and step_agreement(["a"], []) == 0.0
    assert step_agreement(["a", "b", "c"], ["a", "c"]) == pytest.approx(0.8)
    assert verdict_label(judge_check_answer("Yes", "", 0.5)) == "Yes" and verdict_label("B") == "B"


def _group(texts: list[str], correct: list[bool], pid: str = "p0", task: str = "countdown") -> RolloutGroup:
    prompt = Prompt(id=pid, messages=[{"role": "user", "content": "Reach 15 with 6 7 9."}], answer=PROBLEM, task=task)
    return RolloutGroup(prompt, [Rollout(prompt=prompt, prompt_ids=[1], completion=Completion([2], t), reward=float(c))
                                 for t, c in zip(texts, correct, strict=True)])


def test_recycler_writes_the_reference_check_into_judge_tasks() -> None:
    cfg = SparkConfig(enabled=True, judge_check=True, judge_check_weight=0.25, content_mode="cot",
                      judge_per_prompt=1.0, pointwise_prob_mixed=0.0)
    pair = Recycler(cfg).recycle([_group([RIGHT, WRONG], [True, False])], step=1)[0]
    assert pair.kind == "pairwise" and pair.prompt.task == "judge_check"
    label, check, weight = parse_judge_check_answer(pair.prompt.answer)
    assert label == pair.label and weight == 0.25
    first, second = (RIGHT_CHECK, WRONG_CHECK) if label == "A" else (WRONG_CHECK, RIGHT_CHECK)
    assert check == f"A: {first} B: {second}"
    point = Recycler(cfg).recycle([_group([WRONG, WRONG], [False, False])], step=1)[0]
    assert point.prompt.task == "judge_check" and parse_judge_check_answer(point.prompt.answer)[:2] == ("No", WRONG_CHECK)
    # a task without a check writer keeps the plain judge verifier; off keeps it everywhere
    other = Recycler(cfg).recycle([_group([WRONG, WRONG], [False, False], task="math")], step=1)[0]
    assert (other.prompt.task, other.prompt.answer) == ("judge", "No")
    off = Recycler(SparkConfig(enabled=True)).recycle([_group([WRONG, WRONG], [False, False])], step=1)[0]
    assert (off.prompt.task, off.prompt.answer) == ("judge", "No")
    assert check_steps(WRONG, PROBLEM)[0] == WRONG_CHECK


def test_judge_balance_cuts_the_majority_label() -> None:
    groups = [_group([WRONG, WRONG], [False, False], f"w{i}") for i in range(5)]
    groups += [_group([RIGHT, RIGHT], [True, True], f"r{i}") for i in range(2)]
    cfg = SparkConfig(enabled=True, judge_per_prompt=1.0, reflection_per_prompt=0.0, judge_balance=True)
    rec = Recycler(cfg)
    out = rec.recycle(groups, step=3)
    labels = sorted(s.label for s in out)
    assert labels == ["No", "No", "Yes", "Yes"] and rec.last_stats["spark/balanced_out"] == 3
    assert [s.prompt.id for s in out] == [s.prompt.id for s in rec.recycle(groups, step=3)]  # seeded
    unbalanced = Recycler(SparkConfig(enabled=True, judge_per_prompt=1.0, reflection_per_prompt=0.0))
    assert len(unbalanced.recycle(groups, step=3)) == 7
    assert "spark/balanced_out" not in unbalanced.last_stats


def test_config_rejects_a_bad_weight() -> None:
    with pytest.raises(ConfigError, match="judge_check_weight"):
        SparkConfig(judge_check_weight=1.5)


def test_kind_metrics_reports_verdict_accuracy_of_checked_tasks() -> None:
    cfg = SparkConfig(enabled=True, judge_check=True, content_mode="cot", judge_per_prompt=1.0)
    task = Recycler(cfg).recycle([_group([WRONG, WRONG], [False, False])], step=1)[0].prompt
    rollouts = [Rollout(prompt=task, prompt_ids=[1], completion=Completion([2], text), reward=VERIFY(text, task.answer))
                for text in ("\\boxed{No}", f"{WRONG_CHECK} \\boxed{{Yes}}")]
    metrics = kind_metrics(rollouts)
    assert metrics["judge_accuracy"] == pytest.approx(0.5) and metrics["judge_verdict_accuracy"] == 0.5
    assert json.loads(task.answer)["label"] == "No"


def test_check_demo_adds_the_reference_to_judge_check_groups_only() -> None:
    from spark_mcore.spark.demos import with_check_demos

    cfg = SparkConfig(enabled=True, judge_check=True, content_mode="cot", judge_per_prompt=1.0,
                      reflection_per_prompt=1.0)
    tasks = Recycler(cfg).recycle([_group([WRONG, WRONG], [False, False])], step=1)
    assert [t.kind for t in tasks] == ["pointwise", "reflection"]
    groups = [RolloutGroup(t.prompt, [Rollout(prompt=t.prompt, prompt_ids=[5, 6], completion=Completion([2], "x"),
                                              reward=0.0, policy_version=4)] * 2) for t in tasks]
    out, added = with_check_demos(groups, lambda text: [len(text), 9])
    assert added == 1 and len(out[0].rollouts) == 3 and out[1] is groups[1]
    demo = out[0].rollouts[-1]
    assert demo.completion.text == f"{WRONG_CHECK} \\boxed{{No}}" and demo.reward == 1.0
    assert demo.prompt_ids == [5, 6] and demo.completion.token_ids == [len(demo.completion.text), 9]
    assert demo.policy_version == 4 and demo.completion.logprobs is None
    with pytest.raises(ConfigError, match="judge_check"):
        SparkConfig(check_demo=True)
