"""tools/compare_spark_grpo.py: the table (mean ± std over seeds) and the issue's checks."""

from __future__ import annotations

import dataclasses
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
    out.update(judge=judge, greedy=greedy, sr_delta=delta, train_s=10.0, eval_s=5.0, judge_rows=20.0)
    return out


def _per_seed(spark_judge: list[float]) -> dict:
    return {s: {"sft": _res(0.6, 0.3, -0.05), "grpo": _res(0.6, 0.4, -0.04), "spark": _res(j, 0.40, 0.02)}
            for s, j in enumerate(spark_judge)}


def test_a_constant_judge_fails_the_sanity_line() -> None:
    ok = [holds for _, holds, _ in tool.checks(_per_seed([0.50, 0.50, 0.50]))]
    assert ok[0] is False and ok[3] is False  # GRPO at 0.6 here; a judge at chance is not above it


def test_mean_std() -> None:
    assert tool.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert tool.mean_std([0.5]) == (0.5, 0.0)


def test_checks_pass_and_fail_on_the_margins() -> None:
    ok = {claim: holds for claim, holds, _ in tool.checks(_per_seed([0.70, 0.72, 0.74]))}
    assert list(ok.values()) == [True, True, True, True]
    # a mean gain of 0.02 with a seed std of 0.1 is not "more than the larger std"
    ok = {claim: holds for claim, holds, _ in tool.checks(_per_seed([0.52, 0.62, 0.72]))}
    assert list(ok.values()) == [False, True, True, True]


def test_table_shows_mean_and_std_per_model_and_each_seed() -> None:
    md = tool.table(_per_seed([0.70, 0.72, 0.74]))
    assert "| judge acc (mean of the two) | 60.0 ± 0.0 | 60.0 ± 0.0 | 72.0 ± 2.0 |" in md
    assert "| self-reflection change vs greedy | -5.0 ± 0.0 | -4.0 ± 0.0 | +2.0 ± 0.0 |" in md
    assert md.count("| 2 | SPARK |") == 1


def test_arguments_are_validated() -> None:
    with pytest.raises(SystemExit):
        tool.parse_args(["--samples", "1"])
    assert tool.parse_args(["--task", "arith", "--seeds", "0"]).task == "arith"


def test_the_shared_warm_start_is_keyed_by_its_configuration(tmp_path: Path) -> None:
    spec = tool.TASKS["countdown"]
    args = tool.parse_args(["--shared-warm-start", "--seeds", "0", "1"])
    d0, over = tool.shared_warm_start(tmp_path, spec, args)
    assert d0.parent == tmp_path and d0.name.startswith("warmstart-") and "trainer.seed=0" in over
    assert tool.shared_warm_start(tmp_path, spec, args)[0] == d0  # same config -> same directory
    other = tool.parse_args(["--shared-warm-start", "--sft-set", "warmstart.steps=10"])
    assert tool.shared_warm_start(tmp_path, spec, other)[0] != d0
    assert tool.shared_warm_start(tmp_path, spec, tool.parse_args(["--shared-warm-start", "--warm-start-seed", "1"]))[0] != d0
    cont = tool.parse_args(["--shared-warm-start", "--continue-steps", "400"])
    assert tool.shared_warm_start(tmp_path, spec, cont)[0] != d0
    assert tool.parse_args(["--continue-steps", "0"]).continue_steps == []  # 0: no continue stage, as before
    two = tool.parse_args(["--shared-warm-start", "--continue-steps", "400", "600"])
    assert two.continue_steps == [400, 600] and tool.shared_warm_start(tmp_path, spec, two)[0] != \
        tool.shared_warm_start(tmp_path, spec, cont)[0]
    own = tool.parse_args(["--shared-warm-start", "--continue-steps", "400", "--own-judge-samples", "8"])
    assert tool.shared_warm_start(tmp_path, spec, own)[0] != tool.shared_warm_start(tmp_path, spec, cont)[0]
    traced = tool.parse_args(["--shared-warm-start", "--continue-steps", "400", "--own-judge-samples", "8",
                              "--own-judge-rationale"])
    assert tool.own_judge(traced).rationale and not tool.own_judge(own).rationale
    assert tool.shared_warm_start(tmp_path, spec, traced)[0] != tool.shared_warm_start(tmp_path, spec, own)[0]


def test_own_judge_arguments_are_validated() -> None:
    for bad in (["--own-judge-samples", "8"], ["--continue-steps", "10", "--own-judge-samples", "1"],
                ["--continue-steps", "10", "--own-judge-samples", "8", "--own-judge-share", "2"],
                ["--continue-steps", "-3"]):
        with pytest.raises(SystemExit):
            tool.parse_args(bad)
    args = tool.parse_args(["--continue-steps", "10", "--own-judge-samples", "8", "--own-judge-prompts", "64"])
    assert tool.own_judge(args) == tool.OwnJudge(8, 64, 0.5, 2)


def test_staged_warm_start_chains_exports_and_feeds_own_rows_to_the_last_stage(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[tuple[str, list[str]]] = []

    def fake_train(run_dir: Path, config: Path, overrides: list[str], reuse: bool) -> float:
        runs.append((run_dir.name, overrides))
        (run_dir / "tokenizer").mkdir(parents=True)
        return 1.0

    def fake_rows(prev_hf: Path, config: Path, overrides: list[str], own: object, path: Path, reuse: bool) -> Path:
        assert prev_hf.parent.name == "ws-stage2"  # the stage before the last
        return path

    monkeypatch.setattr(tool, "train_run", fake_train)
    monkeypatch.setattr(tool, "own_judge_file", fake_rows)
    wall = tool.warm_start_run(tmp_path / "ws", Path("c.yaml"), ["a=1"], [400, 600], False, tool.OwnJudge(8))
    assert wall == pytest.approx(3.0, abs=0.5) and [name for name, _ in runs] == ["ws-stage1", "ws-stage2", "ws"]
    assert f"model.hf_path={tmp_path / 'ws-stage1' / 'hf'}" in runs[1][1] and "warmstart.steps=400" in runs[1][1]
    last = runs[2][1]
    assert f"model.hf_path={tmp_path / 'ws-stage2' / 'hf'}" in last and "warmstart.steps=600" in last
    assert f"warmstart.judge_file={tmp_path / 'ws-own_judge.jsonl'}" in last
    assert not any(o.startswith("warmstart.judge_file=") for o in runs[1][1])  # only the last stage
    with pytest.raises(SystemExit, match="continue-steps"):
        tool.warm_start_run(tmp_path / "x", Path("c.yaml"), [], [], False, tool.OwnJudge(8))


def test_report_only_builds_the_table_from_saved_seeds(tmp_path: Path) -> None:
    import json

    for seed, per in _per_seed([0.70, 0.72]).items():
        (tmp_path / f"seed{seed}").mkdir()
        (tmp_path / f"seed{seed}" / "seed_results.json").write_text(json.dumps(per))
    assert tool.main(["--report-only", "--seeds", "0", "1", "--out", str(tmp_path), "--eval-prompts", "4"]) == 0
    assert "71.0 ± 1.4" in (tmp_path / "results.md").read_text()
    with pytest.raises(SystemExit, match="seed2"):
        tool.main(["--report-only", "--seeds", "2", "--out", str(tmp_path), "--eval-prompts", "4"])


def test_training_runs_get_one_thread_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert tool.run_env()["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert tool.run_env()["OMP_NUM_THREADS"] == "2"


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


def test_config_option_replaces_the_task_config_and_keys_the_warm_start(tmp_path: Path) -> None:
    base = tool.parse_args(["--shared-warm-start"])
    assert tool.task_spec(base) == tool.TASKS["countdown"]
    yaml = tmp_path / "other.yaml"
    yaml.write_text(tool.TASKS["countdown"].config.read_text() + "# a comment\n")
    other = tool.parse_args(["--shared-warm-start", "--config", str(yaml)])
    spec = tool.task_spec(other)
    assert spec.config == yaml.resolve() and spec.rl == tool.TASKS["countdown"].rl
    assert tool.shared_warm_start(tmp_path, spec, other)[0] != \
        tool.shared_warm_start(tmp_path, tool.task_spec(base), base)[0]  # the config's text is in the key
    with pytest.raises(SystemExit):
        tool.parse_args(["--config", str(tmp_path / "missing.yaml")])


def test_the_fourth_round_config_loads_with_its_spark_options() -> None:
    from spark_mcore.config.run import load_run_config

    path = tool.REPO / "examples" / "configs" / "compare_countdown_check.yaml"
    cfg = load_run_config(path, [])
    assert (cfg.spark.judge_check, cfg.spark.judge_balance, cfg.spark.check_demo) == (True, True, True)
    assert cfg.spark.reward_lr_scale == 0.25 and cfg.rollout.max_new_tokens == cfg.eval.max_new_tokens == 128
    tool.check_arms(tool.parse_args(["--config", str(path)]), tool.task_spec(tool.parse_args(["--config", str(path)])))


def test_the_fifth_round_config_is_the_fourth_with_full_lr_reward_steps() -> None:
    from spark_mcore.config.run import load_run_config

    configs = tool.REPO / "examples" / "configs"
    room = load_run_config(configs / "compare_countdown_room.yaml", [])
    check = load_run_config(configs / "compare_countdown_check.yaml", [])
    assert room.spark.reward_lr_scale == 1.0
    assert dataclasses.replace(room.spark, reward_lr_scale=0.25) == check.spark
    assert (room.model, room.warmstart, room.data, room.trainer) == (check.model, check.warmstart, check.data,
                                                                     check.trainer)


def test_the_judge_set_is_shared_with_a_shared_warm_start_unless_asked_per_seed() -> None:
    assert tool.parse_args(["--shared-warm-start"]).shared_judge_set
    assert not tool.parse_args(["--shared-warm-start", "--per-seed-judge-set"]).shared_judge_set
    assert not tool.parse_args([]).shared_judge_set  # per-seed warm starts: per-seed sets
    assert tool.parse_args(["--eval-prompts", "0"]).eval_prompts == 0  # 0 = every held-out prompt
    for bad in (["--eval-prompts", "-1"], ["--rescore", "--report-only"], ["--rescore", "--warm-start-only"]):
        with pytest.raises(SystemExit):
            tool.parse_args(bad)


def test_eval_prompts_zero_takes_the_whole_held_out_pool() -> None:
    args = tool.parse_args(["--eval-prompts", "0"])
    prompts = tool.eval_setup(args, tool.task_spec(args)).prompts
    assert len(prompts) == 176 and len({p.answer for p in prompts}) == 176  # level 1's test pool


def _setup(prompts: list) -> object:
    return tool.EvalSetup(prompts, 8, 1.0, 128, 2, "samples", 0)


def test_the_shared_judge_set_is_keyed_by_warm_start_prompts_and_seed(tmp_path: Path) -> None:
    from spark_mcore.data.countdown import countdown_problems

    p = countdown_problems([1], "test", 8, 0)
    d = tool.judge_set_dir(tmp_path, tmp_path / "warmstart-a", _setup(p), 0)
    assert d.parent == tmp_path and d.name.startswith("judgeset-")
    assert d == tool.judge_set_dir(tmp_path, tmp_path / "warmstart-a", _setup(list(p)), 0)
    others = [tool.judge_set_dir(tmp_path, tmp_path / "warmstart-b", _setup(p), 0),
              tool.judge_set_dir(tmp_path, tmp_path / "warmstart-a", _setup(p[:4]), 0),
              tool.judge_set_dir(tmp_path, tmp_path / "warmstart-a", _setup(p), 1)]
    assert d not in others and len(set(others)) == 3


def test_rescore_trains_nothing_keeps_train_times_and_every_seed_reads_one_set(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    args = tool.parse_args(["--shared-warm-start", "--rescore", "--seeds", "0", "1", "--out", str(tmp_path)])
    spec = tool.task_spec(args)
    ws, _ = tool.shared_warm_start(tmp_path, spec, args)
    for run in [ws, *(tmp_path / f"seed{s}" / a for s in (0, 1) for a in ("grpo", "spark"))]:
        (run / "hf").mkdir(parents=True)
        (run / "hf" / "config.json").write_text("{}")
    (tmp_path / "seed0" / "seed_results.json").write_text(json.dumps({"grpo": {"train_s": 121.0}}))
    shared, evaluated = object(), []

    def fake_eval(hf: Path, setup: object, seed: int, rows: object, out: Path) -> tuple[dict, object]:
        assert rows is shared  # never built per seed
        evaluated.append((seed, hf.parent.name))
        return {"judge": 0.5}, rows

    monkeypatch.setattr(tool, "train_run", lambda *a, **k: pytest.fail("--rescore must not train"))
    monkeypatch.setattr(tool, "warm_start_run", lambda *a, **k: pytest.fail("--rescore must not train"))
    monkeypatch.setattr(tool, "shared_judge_rows", lambda out, sft, setup, seed: shared)
    monkeypatch.setattr(tool, "evaluate", fake_eval)
    res = {s: tool.run_seed(s, tmp_path, spec, _setup([]), args) for s in (0, 1)}
    assert evaluated == [(0, ws.name), (0, "grpo"), (0, "spark"), (1, ws.name), (1, "grpo"), (1, "spark")]
    assert res[0]["grpo"]["train_s"] == 121.0 and res[1]["grpo"]["train_s"] == 0.0
    assert json.loads((tmp_path / "seed0" / "seed_results.before_rescore.json").read_text())["grpo"]["train_s"] == 121.0
    (tmp_path / "seed1" / "spark" / "hf" / "config.json").unlink()
    with pytest.raises(SystemExit, match="no export"):
        tool.run_seed(1, tmp_path, spec, _setup([]), args)


def test_arms_take_the_export_tokenizer_when_the_warm_start_wrote_none(tmp_path: Path) -> None:
    (tmp_path / "hf").mkdir()
    assert tool.tokenizer_of(tmp_path) == tmp_path / "hf", "a zero-step warm start: only its export has one"
    (tmp_path / "tokenizer").mkdir()
    assert tool.tokenizer_of(tmp_path) == tmp_path / "tokenizer", "the run's own tokenizer first"
