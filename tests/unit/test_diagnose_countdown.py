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


def test_drill_compare_scores_each_comparison_sentence_against_the_reference(monkeypatch) -> None:
    """Part e: a reply that flips the word of one `differ` comparison per row, and drops the
    last sentence of every other row, is scored sentence by sentence."""
    from types import SimpleNamespace

    import spark_mcore.spark.judging as judging
    from spark_mcore.data.drill import compare_examples
    from spark_mcore.rewards.countdown_trace import compare_text

    refs = [ref for _, ref in compare_examples(10, tool._PROBE_SEED, compare_text, bound=30)]

    def reply(ref: str, n: int) -> str:
        sentences = tool._SENTENCE.findall(ref)
        flip = next((i for i, s in enumerate(sentences) if s.endswith("differ.") and "digits" not in s), None)
        if flip is not None:
            sentences[flip] = sentences[flip].removesuffix("differ.") + "same."
        return " ".join(sentences if n % 2 else sentences[:-1])

    monkeypatch.setattr(judging, "greedy_params", lambda params: params)
    monkeypatch.setattr(judging, "generate_texts", lambda engine, encode, prompts, params: [
        reply(r, n) for n, r in enumerate(refs)])
    model = SimpleNamespace(engine=None, encode=None, params=lambda max_new: None)
    got = tool.drill_compare(model, rows=10, bound=30, max_new=64)
    sentences = [tool._SENTENCE.findall(r) for r in refs]
    flipped = sum(any(s.endswith("differ.") and "digits" not in s for s in ss) for ss in sentences)
    dropped = sum(1 for n, ss in enumerate(sentences) if n % 2 == 0)
    flipped_last_dropped = sum(1 for n, ss in enumerate(sentences) if n % 2 == 0 and
                               [i for i, s in enumerate(ss) if s.endswith("differ.") and "digits" not in s][:1] ==
                               [len(ss) - 1])
    wrong = flipped + dropped - flipped_last_dropped
    assert got["comparisons"] == 30 and got["bound"] == 30
    assert got["right"] == round((30 - wrong) / 30, 3)
    assert got["digits_right_word_wrong"] == round((flipped - flipped_last_dropped) / 30, 3)
    assert flipped > 0 and got["right_by_truth"]["differ"] < 1.0
