"""tools/compare_spark_grpo.py: the table (mean ± std over seeds) and the issue's checks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "tools" / "compare_spark_grpo.py"
_spec = importlib.util.spec_from_file_location("compare_spark_grpo", _PATH)
tool = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = tool  # dataclasses look their module up
_spec.loader.exec_module(tool)  # type: ignore[union-attr]


def _res(judge: float, greedy: float, delta: float) -> dict[str, float]:
    out = {k: 0.5 for k in tool.METRICS}
    out.update(judge=judge, greedy=greedy, sr_delta=delta, train_s=10.0)
    return out


def _per_seed(spark_judge: list[float]) -> dict:
    return {s: {"sft": _res(0.6, 0.3, -0.05), "grpo": _res(0.6, 0.4, -0.04), "spark": _res(j, 0.40, 0.02)}
            for s, j in enumerate(spark_judge)}


def test_mean_std() -> None:
    assert tool.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert tool.mean_std([0.5]) == (0.5, 0.0)


def test_checks_pass_and_fail_on_the_margins() -> None:
    ok = {claim: holds for claim, holds, _ in tool.checks(_per_seed([0.70, 0.72, 0.74]))}
    assert list(ok.values()) == [True, True, True]
    # a mean gain of 0.02 with a seed std of 0.1 is not "more than the larger std"
    ok = {claim: holds for claim, holds, _ in tool.checks(_per_seed([0.52, 0.62, 0.72]))}
    assert list(ok.values()) == [False, True, True]


def test_table_shows_mean_and_std_per_model_and_each_seed() -> None:
    md = tool.table(_per_seed([0.70, 0.72, 0.74]))
    assert "| judge acc (mean of the two) | 60.0 ± 0.0 | 60.0 ± 0.0 | 72.0 ± 2.0 |" in md
    assert "| self-reflection change vs greedy | -5.0 ± 0.0 | -4.0 ± 0.0 | +2.0 ± 0.0 |" in md
    assert md.count("| 2 | SPARK |") == 1


def test_arguments_are_validated() -> None:
    with pytest.raises(SystemExit):
        tool.parse_args(["--samples", "1"])
    assert tool.parse_args(["--task", "arith", "--seeds", "0"]).task == "arith"


def test_arms_are_parsed_and_validated() -> None:
    assert tool.parse_args([]).arms == ["grpo", "spark"]
    assert tool.parse_args(["--arms", "grpo,spark,spro,prefix,spark+spro"]).arms == list(tool.ARMS)
    assert tool.parse_args(["--arms", "prefix, grpo,prefix"]).arms == ["prefix", "grpo"]
    with pytest.raises(SystemExit):
        tool.parse_args(["--arms", "grpo,ppo"])
    with pytest.raises(tool.argparse.ArgumentTypeError, match="unknown arm"):
        tool.parse_arms("grpo,,spark")
    assert set(tool.ARMS) <= set(tool.MODELS)  # every arm has a table label
    tool.check_arms(tool.parse_args(["--arms", "grpo,spark,spro,prefix,spark+spro"]), tool.TASKS["countdown"])


def test_table_has_one_row_per_arm_and_checks_need_grpo_and_spark() -> None:
    per_seed = {s: {"sft": _res(0.6, 0.3, 0.0), "grpo": _res(0.6, 0.4, 0.0), "prefix": _res(0.5, 0.45, 0.01)}
                for s in range(2)}
    md = tool.table(per_seed)
    assert "| metric | warm start | GRPO-only | Prefix-RFT |" in md and "SPARK" not in md
    assert md.count("| 1 | Prefix-RFT |") == 1
    assert tool.checks(per_seed) == []
