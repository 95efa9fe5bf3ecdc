"""The built-in countdown task: levels, determinism, disjoint splits, solvable instances, worked
and wrong solutions as the verifier sees them, and its judge warm-start tasks."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest

from spark_mcore.data import countdown
from spark_mcore.data.config import DataConfig
from spark_mcore.data.dataset import load_prompts, sft_examples
from spark_mcore.data.jsonl import DatasetError
from spark_mcore.rewards import get_verifier
from spark_mcore.spark.warmstart_data import judge_sft_examples

V = get_verifier("countdown")


@pytest.fixture(scope="module")
def train() -> list:
    return countdown.countdown_problems([3, 4, 5], "train", 600, seed=0)


def _key(p) -> tuple:
    a = json.loads(p.answer)
    return tuple(sorted(a["numbers"])), a["target"]


def test_levels_are_the_count_of_numbers(train: list) -> None:
    for p in train:
        a = json.loads(p.answer)
        assert len(a["numbers"]) == p.meta["level"] and 1 <= a["target"] <= countdown.MAX_TARGET
        assert a["target"] not in a["numbers"]
        assert f"Target: {a['target']}." in p.messages[0]["content"] and p.task == "countdown"
    assert set(Counter(p.meta["level"] for p in train)) == {3, 4, 5}


def test_deterministic_by_seed_and_a_larger_size_appends(train: list) -> None:
    again = countdown.countdown_problems([3, 4, 5], "train", 600, seed=0)
    assert [p.answer for p in again] == [p.answer for p in train]
    assert [p.answer for p in countdown.countdown_problems([3, 4, 5], "train", 300, seed=0)] == \
        [p.answer for p in train[:300]]
    other = countdown.countdown_problems([3, 4, 5], "train", 600, seed=1)
    assert [p.answer for p in other] != [p.answer for p in train]
    assert len({_key(p) for p in train}) == len(train)  # no repeats within a split


def test_train_and_test_are_disjoint(train: list) -> None:
    test = countdown.countdown_problems([3, 4, 5], "test", 300, seed=0)
    assert not {_key(p) for p in train} & {_key(p) for p in test}
    assert all(countdown.split_of(f"{'.'.join(map(str, k[0]))}>{k[1]}") == "test" for k in map(_key, test))


def test_every_instance_is_solved_by_its_worked_solutions(train: list) -> None:
    searched = 0
    for p in train:
        worked = countdown.worked_solution(p)
        assert V(worked, p.answer) == 1.0 and V(countdown.right_solution(p), p.answer) == 1.0
        searched += ", no." in worked
    assert 0.2 < searched / len(train) < 0.5  # some write the search out


def test_wrong_solutions_of_every_kind_score_zero(train: list) -> None:
    kinds: Counter = Counter()
    for i, p in enumerate(train):
        text, kind = countdown.wrong_solution(p, random.Random(i))
        assert V(text, p.answer) == 0.0, (text, p.answer, kind)
        assert text == countdown.wrong_solution(p, random.Random(i))[0]
        kinds[kind] += 1
    assert set(kinds) == set(countdown.WRONG_KINDS)


def test_builtin_source_and_level_errors() -> None:
    cfg = DataConfig(source="builtin:countdown", levels=[3], train_size=5, test_size=3)
    assert [p.meta["source"] for p in load_prompts(cfg, "test")] == ["countdown"] * 3
    assert len(sft_examples(load_prompts(cfg, "train"))) == 5
    with pytest.raises(DatasetError, match=r"countdown levels are \[1, 2, 3, 4, 5\].*data.levels=\[3,4\]"):
        load_prompts(DataConfig(source="builtin:countdown", levels=[0, 6]), "train")


@pytest.fixture(scope="module")
def easy() -> list:
    return countdown.countdown_problems([1, 2], "train", 400, seed=0)


def test_easy_levels_show_three_one_digit_numbers_and_small_values(easy: list) -> None:
    for p in easy:
        a, chain = json.loads(p.answer), p.meta["chain"]
        spec = countdown.LEVELS[p.meta["level"]]
        assert len(a["numbers"]) == 3 and all(1 <= n <= 9 for n in a["numbers"])
        assert len(chain["leaves"]) == (2 if p.meta["level"] == 1 else 3)  # level 1: one distractor
        assert 1 <= a["target"] <= spec.max_target and a["target"] not in a["numbers"]
        worked = countdown.worked_solution(p)
        # every step (failed attempts included) stays within the level's bound
        assert all(int(r) <= spec.max_intermediate for r in re.findall(r"=(\d+)", worked))
        assert V(worked, p.answer) == 1.0
    assert set(Counter(p.meta["level"] for p in easy)) == {1, 2}


def test_easy_levels_are_deterministic_disjoint_and_wrong_solutions_score_zero(easy: list) -> None:
    assert [p.answer for p in countdown.countdown_problems([1, 2], "train", 400, seed=0)] == [p.answer for p in easy]
    test = countdown.countdown_problems([1, 2], "test", 100, seed=0)
    assert not {_key(p) for p in easy} & {_key(p) for p in test}
    for i, p in enumerate(easy[:100]):
        assert V(countdown.wrong_solution(p, random.Random(i))[0], p.answer) == 0.0


def test_judge_warm_start_tasks_from_countdown_prompts(train: list) -> None:
    tasks = judge_sft_examples(train[:30], 30, seed=0)
    for task, target in tasks:
        kind, cands = task.meta["spark_kind"], task.meta["candidates"]
        src = next(p for p in train if p.id == task.meta["source_prompt_id"])
        if kind == "pointwise":
            assert (V(cands[0], src.answer) == 1.0) == (task.answer == "Yes") and target == f"\\boxed{{{task.answer}}}"
        elif kind == "pairwise":
            assert [V(c, src.answer) for c in cands] == ([1.0, 0.0] if task.answer == "A" else [0.0, 1.0])
        else:
            assert V(cands[0], src.answer) == 0.0 and V(target, task.answer) == 1.0


def test_an_exhausted_pool_repeats_with_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    # a tiny level (numbers 1-3) has only a handful of problems: the stream must not spin forever
    monkeypatch.setitem(countdown.LEVELS, 3, countdown.LevelSpec(3, 3))
    monkeypatch.setattr(countdown, "_MAX_MISSES", 200)
    prompts = countdown.countdown_problems([3], "train", 50, seed=0)
    assert len(prompts) == 50 and len({p.answer for p in prompts}) < 50
    assert "pool seems exhausted" in caplog.text
    assert all(V(countdown.worked_solution(p), p.answer) == 1.0 for p in prompts)


def test_the_countdown_comparison_config_loads_with_judge_warm_start_tasks() -> None:
    from pathlib import Path

    from spark_mcore.config.run import load_run_config

    path = Path(__file__).resolve().parents[2] / "examples" / "configs" / "compare_countdown.yaml"
    cfg = load_run_config(path)
    assert cfg.data.source == "builtin:countdown" and cfg.warmstart.judge_fraction > 0
