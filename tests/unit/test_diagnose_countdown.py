"""tools/diagnose_countdown.py: recycled judge tasks as a reward step makes them, and their verdict
statistics (the round-seven check that no label or parsing bug hides below-chance accuracy)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from spark_mcore.rewards.countdown import countdown_verifier
from spark_mcore.spark.config import SparkConfig
from spark_mcore.types import Completion, Prompt, Rollout, RolloutGroup

_PATH = Path(__file__).resolve().parents[2] / "tools" / "diagnose_countdown.py"
_spec = importlib.util.spec_from_file_location("diagnose_countdown", _PATH)
tool = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = tool
_spec.loader.exec_module(tool)  # type: ignore[union-attr]

ANS = json.dumps({"numbers": [9, 4, 5], "target": 13})
QUESTION = "Numbers: 9 4 5. Target: 13.\nUse each number at most once with + - * / and parentheses. Put the expression in \\boxed{}."


def _group(i: int, texts: list[str], prompt: Prompt | None = None) -> RolloutGroup:
    p = prompt or Prompt(id=f"countdown-train-{i:06d}", messages=[{"role": "user", "content": QUESTION}],
                         answer=ANS, task="countdown")
    rollouts = [Rollout(p, [1], Completion([1], t), reward=countdown_verifier(t, ANS) if p.task == "countdown" else 0)
                for t in texts]
    return RolloutGroup(p, rollouts)


def test_recycled_tasks_carry_labels_that_match_their_reference_checks() -> None:
    right, wrong = "9+4=13. \\boxed{9+4}", "9+5=13. \\boxed{9+5}"
    groups = [_group(i, [right, wrong, wrong, right]) for i in range(8)] + [_group(9, [wrong] * 4)]
    cfg = SparkConfig(judge_check=True, judge_balance=True, content_mode="cot", pointwise_prob_mixed=0.5)
    tasks = tool.recycled_tasks(groups, cfg, per_step=4)
    assert tasks and all(t.kind in ("pointwise", "pairwise") for t in tasks)
    sampled = []
    for n, t in enumerate(tasks):  # a judge that always answers "Yes" / "A"
        say = "\\boxed{Yes}" if t.kind == "pointwise" else "\\boxed{A}"
        sampled.append(_group(n, [say, "no box", "\\boxed{maybe}"], t.prompt))
    stats = tool.verdict_stats(sampled, 128)
    labels = [t.label for t in tasks]
    assert stats["verdict_acc"]["all"] == round(sum(lab in ("Yes", "A") for lab in labels) / len(labels) / 3, 3)
    assert stats["verdict_box"]["none"] == round(1 / 3, 3) and stats["verdict_box"]["other"] == round(1 / 3, 3)
    points = sum(t.kind == "pointwise" for t in tasks)
    assert stats["pointwise_label_matches_reference_check"] == ({"True": points} if points else {})


def test_answer_of_reads_the_rendered_question() -> None:
    assert json.loads(tool._answer_of(QUESTION)) == {"numbers": [9, 4, 5], "target": 13}


def test_reflection_tasks_and_their_stats_count_verdict_answers_as_unsolved() -> None:
    right, wrong = "9+4=13. \\boxed{9+4}", "9+5=13. \\boxed{9+5}"
    groups = [_group(i, [right, wrong, wrong, right]) for i in range(4)] + [_group(5, [wrong] * 4)]
    tasks = tool.recycled_tasks(groups, SparkConfig(content_mode="cot"), per_step=5, reflection=True)
    assert tasks and all(t.kind == "reflection" and t.prompt.task == "countdown" for t in tasks)
    # the first task answered with a corrected expression once, every other response a verdict
    sampled = [_group(n, [right if n == 0 else "9+5=14. 14 vs 13: differ. \\boxed{No}", "\\boxed{ no }"], t.prompt)
               for n, t in enumerate(tasks)]
    stats = tool.reflection_stats(sampled)
    n = 2 * len(tasks)
    assert stats["tasks"] == len(tasks) and stats["responses"] == n and stats["solved_tasks"] == 1
    assert stats["reward_mean"] == round(1 / n, 3) and stats["ends_in_verdict"] == round((n - 1) / n, 3)
