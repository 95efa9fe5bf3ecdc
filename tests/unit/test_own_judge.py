"""Judge warm-start rows from a model's own verified answers (spark_mcore.spark.own_judge)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest

from spark_mcore.config.loader import ConfigError
from spark_mcore.data.arith import arith_problems
from spark_mcore.spark.own_judge import file_judge_examples, load_rows, own_judge_rows, save_rows
from spark_mcore.spark.warmstart_data import judge_sft_examples
from spark_mcore.trainer.config import WarmStartConfig
from spark_mcore.types import JUDGE_TASK, KIND_KEY, Completion, Prompt, Rollout, RolloutGroup

QUESTION = "Numbers: 5 1 3. Target: 6.\nUse each number at most once."


def _group(pid: str, texts: list[str], correct: list[bool]) -> RolloutGroup:
    p = Prompt(id=pid, messages=[{"role": "user", "content": QUESTION}], answer="{}", task="countdown")
    return RolloutGroup(p, [Rollout(p, [0], Completion([0], t), float(c)) for t, c in zip(texts, correct, strict=True)])


RIGHT, WRONG = "5+1=6. \\boxed{5+1}", "5+3=8. \\boxed{5+3}"


def test_a_mixed_group_gives_balanced_pointwise_and_both_pair_orders() -> None:
    rows = own_judge_rows([_group("p0", [WRONG, RIGHT, WRONG, RIGHT], [False, True, False, True])], content_mode="cot")
    assert sorted((r.kind, r.label) for r in rows) == [("pairwise", "A"), ("pairwise", "B"),
                                                      ("pointwise", "No"), ("pointwise", "Yes")]
    yes = next(r for r in rows if r.label == "Yes")
    no = next(r for r in rows if r.label == "No")
    assert RIGHT in yes.prompt and WRONG not in yes.prompt and WRONG in no.prompt and "Target: 6" in yes.prompt
    a = next(r for r in rows if r.label == "A").prompt
    b = next(r for r in rows if r.label == "B").prompt
    assert a.index(RIGHT) < a.index(WRONG) and b.index(WRONG) < b.index(RIGHT)  # the right one is at the label
    assert yes.target == "\\boxed{Yes}"


def test_only_mixed_groups_count_and_per_group_caps_distinct_pairs() -> None:
    same = [_group("all-wrong", [WRONG, WRONG], [False, False]), _group("all-right", [RIGHT], [True])]
    assert own_judge_rows(same) == []
    wrong2 = "5*3=15. \\boxed{5*3}"
    g = _group("p1", [RIGHT, WRONG, wrong2, RIGHT, "1+5=6. \\boxed{1+5}"], [True, False, False, True, True])
    assert len(own_judge_rows([g], per_group=1)) == 4
    assert len(own_judge_rows([g], per_group=5)) == 8  # two distinct wrong texts: two pairs
    assert own_judge_rows([g], seed=3) == own_judge_rows([g], seed=3)  # deterministic
    with pytest.raises(ValueError, match="per_group"):
        own_judge_rows([g], per_group=0)


def test_rows_round_trip_and_a_bad_line_names_the_file_and_line(tmp_path: Path) -> None:
    rows = own_judge_rows([_group("p0", [RIGHT, WRONG], [True, False])])
    path = tmp_path / "own.jsonl"
    save_rows(rows, path)
    assert load_rows(path) == rows
    path.write_text(path.read_text() + '{"prompt": "x", "kind": "pointwise", "label": "Maybe"}\n')
    with pytest.raises(ValueError, match=r"own.jsonl:5"):
        load_rows(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_rows(tmp_path / "missing.jsonl")


def test_file_examples_take_their_share_and_the_rest_is_synthetic() -> None:
    rows = own_judge_rows([_group("p0", [RIGHT, WRONG], [True, False])])
    calls = []

    def synthetic(prompts: list[Prompt], count: int, seed: int) -> list[tuple[Prompt, str]]:
        calls.append(count)
        return [(Prompt(id=f"s{i}", messages=[{"role": "user", "content": "s"}], answer="a"), "x") for i in range(count)]

    out = file_judge_examples(rows, 0.7, synthetic)([], 10, 0)
    own = [(p, t) for p, t in out if p.meta.get("own")]
    assert len(out) == 10 and len(own) == 7 and calls == [3]  # 4 rows repeat to fill 7 slots
    assert all(p.task == JUDGE_TASK and p.meta[KIND_KEY] in ("pointwise", "pairwise") for p, _ in own)
    assert {t for _, t in own} <= {"\\boxed{Yes}", "\\boxed{No}", "\\boxed{A}", "\\boxed{B}"}
    assert file_judge_examples(rows, 1.0, synthetic)([], 4, 0) and calls == [3]  # share 1: no synthetic call


def test_own_rows_with_synthetic_reflection_only_keep_every_judge_target_an_own_row() -> None:
    """warmstart.judge_kinds=[reflection] (how `train.prepare` builds the source): the synthetic
    share adds only reflection rows, whose targets are worked solutions, never bare verdicts."""
    rows = own_judge_rows([_group("p0", [RIGHT, WRONG], [True, False])])
    source = file_judge_examples(rows, 0.5, partial(judge_sft_examples, kinds=("reflection",)))
    out = source(arith_problems([1], "train", 20, seed=0), 8, 0)
    synthetic = [(p, t) for p, t in out if not p.meta.get("own")]
    assert len(out) == 8 and len(synthetic) == 4
    assert all(p.meta[KIND_KEY] == "reflection" and "boxed{" in t and "Yes" not in t for p, t in synthetic)


def test_the_config_field_is_validated() -> None:
    with pytest.raises(ConfigError, match="judge_fraction > 0"):
        WarmStartConfig(judge_file="rows.jsonl")
    with pytest.raises(ConfigError, match="judge_file_share"):
        WarmStartConfig(judge_fraction=0.3, judge_file="rows.jsonl", judge_file_share=1.5)
    assert WarmStartConfig(judge_fraction=0.3, judge_file="rows.jsonl").judge_file_share == 0.5

