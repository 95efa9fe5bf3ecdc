"""spark_mcore.eval.judge_set: one judge set shared by processes, and the whole held-out pool."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from spark_mcore.data.countdown import countdown_problems
from spark_mcore.eval.judge_set import DONE, distinct_prompts, load_judge_set, shared_judge_set
from spark_mcore.eval.reward_bench import HeldOut, PairRow, PointRow


def _rows(tag: str) -> HeldOut:
    return HeldOut(pairs=[PairRow(f"q {tag}", "right", "wrong", (), "p0")],
                   points=[PointRow(f"q {tag}", "right", "Yes", (), "y0"), PointRow(f"q {tag}", "wrong", "No", (), "n0")])


def test_distinct_prompts_is_the_pool_in_its_fixed_order() -> None:
    pool = distinct_prompts(countdown_problems([1], "test", 400, 0))  # level 1 holds 176 test problems
    assert len(pool) == 176
    assert [p.answer for p in countdown_problems([1], "test", 64, 0)] == [p.answer for p in pool[:64]]
    assert len({p.answer for p in pool}) == 176


def test_the_set_is_built_once_then_loaded(tmp_path: Path) -> None:
    calls: list[str] = []

    def build() -> HeldOut:
        calls.append("x")
        return _rows("a")

    rows, built = shared_judge_set(tmp_path / "js", build, {"seed": 0})
    again, built_again = shared_judge_set(tmp_path / "js", build)
    assert (built, built_again, calls) == (True, False, ["x"])
    assert [r.to_dict() for r in again.pairs] == [r.to_dict() for r in rows.pairs]
    assert [r.label for r in again.points] == ["Yes", "No"] and '"pairs": 1' in (tmp_path / "js" / DONE).read_text()


def test_a_half_written_set_is_rebuilt_and_an_empty_one_refused(tmp_path: Path) -> None:
    (tmp_path / "js").mkdir()
    (tmp_path / "js" / "judge_pairs.jsonl").write_text("not json\n")  # died before done.json
    rows, built = shared_judge_set(tmp_path / "js", lambda: _rows("b"))
    assert built and load_judge_set(tmp_path / "js").pairs[0].question == "q b"
    with pytest.raises(RuntimeError, match="empty"):
        shared_judge_set(tmp_path / "other", HeldOut)
    assert not (tmp_path / "other" / DONE).exists()


def test_a_second_caller_waits_for_the_first_build_and_loads_it(tmp_path: Path) -> None:
    entered, release = threading.Event(), threading.Event()
    builds: list[str] = []
    got: dict[str, HeldOut] = {}

    def slow_build() -> HeldOut:
        builds.append("first")
        entered.set()
        assert release.wait(10)
        return _rows("first")

    def call(name: str, build) -> None:  # type: ignore[no-untyped-def]
        got[name] = shared_judge_set(tmp_path / "js", build)[0]

    first = threading.Thread(target=call, args=("first", slow_build))
    first.start()
    assert entered.wait(10)  # the first holds the lock and is building
    second = threading.Thread(target=call, args=("second", lambda: builds.append("second") or _rows("second")))
    second.start()
    release.set()
    first.join(10)
    second.join(10)
    assert builds == ["first"] and got["second"].pairs[0].question == "q first"
