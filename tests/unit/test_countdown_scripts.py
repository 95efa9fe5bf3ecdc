"""examples/countdown_warm_start.sh and countdown_compare.sh (issue 15): both parse, every
setting a stage of the warm-start chain passes is one the run config accepts (so a typo fails
here in a second instead of an hour into the chain), and the comparison runs its seeds in waves
(against a fake compare tool)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from spark_mcore.config.run import load_run_config

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = [REPO / "examples" / "countdown_warm_start.sh", REPO / "examples" / "countdown_compare.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_the_script_parses(script: Path) -> None:
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def stage_settings() -> dict[str, list[str]]:
    """{stage name: its KEY=VALUE settings}, from the `stage NAME FROM STEPS ...` lines."""
    text = (REPO / "examples" / "countdown_warm_start.sh").read_text().replace("\\\n", " ")
    stages = {}
    for line in text.splitlines():
        if re.match(r"stage \w+ ", line):
            words = shlex.split(line)
            stages[words[1]] = [f"warmstart.steps={words[3]}", *words[4:]]
    return stages


def test_every_stage_setting_is_a_valid_config_override() -> None:
    stages = stage_settings()
    assert list(stages) == ["drill06", "ws9", "ws9b", "ws9c", "ws13a", "ws13b", "ws13"]
    config = REPO / "examples" / "configs" / "compare_countdown_room.yaml"
    for name, sets in stages.items():
        cfg = load_run_config(config, [*sets, "warmstart.judge_file=own.jsonl"])
        assert cfg.warmstart.steps == int(sets[0].split("=")[1]), name
    last = load_run_config(config, stages["ws13"])
    assert last.warmstart.judge_kinds == ["reflection"] and last.warmstart.judge_file_share == 0.8
    # from ws13a on, the comparison drill covers countdown's targets (round thirteen)
    assert all(load_run_config(config, stages[s]).warmstart.drill_compare_bound == 30 for s in ("ws13a", "ws13b", "ws13"))


FAKE_COMPARE = '''import json, os, sys, time
args = sys.argv[1:]
rest = args[args.index("--seeds") + 1:]
seeds = rest[: next((i for i, a in enumerate(rest) if a.startswith("--")), len(rest))]
log = os.path.join(os.path.dirname(__file__), "calls.jsonl")
with open(log, "a") as f:
    f.write(json.dumps({"seeds": seeds, "args": args, "start": time.time()}) + "\\n")
if "--warm-start-only" not in args and "--report-only" not in args:
    time.sleep(0.4)
    with open(log, "a") as f:
        f.write(json.dumps({"seeds": seeds, "end": time.time()}) + "\\n")
    sys.exit(3 if seeds == [os.environ.get("FAIL_SEED")] else 0)
'''
FAKE_WARM_START = '''set -e
mkdir -p "$1/ws13/hf" "$1/tok"; touch "$1/ws13/hf/config.json"; ln -sfn "$1/tok" "$1/tokenizer"
'''


def _fake_repo(tmp_path: Path) -> Path:
    """A copy of countdown_compare.sh beside a fake warm-start script and a fake compare tool
    that records its calls (seeds, start and end times)."""
    (tmp_path / "examples").mkdir()
    (tmp_path / "tools").mkdir()
    (tmp_path / "examples" / "countdown_compare.sh").write_text(SCRIPTS[1].read_text())
    (tmp_path / "examples" / "countdown_warm_start.sh").write_text(FAKE_WARM_START)
    (tmp_path / "tools" / "compare_spark_grpo.py").write_text(FAKE_COMPARE)
    return tmp_path


def _run_compare(repo: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(repo / "examples" / "countdown_compare.sh"), str(repo / "out")],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "WARM_START": str(repo / "ws"), **env})


def test_the_comparison_runs_its_seeds_in_waves_of_parallel(tmp_path: Path) -> None:
    repo = _fake_repo(tmp_path)
    done = _run_compare(repo, SEEDS="0 1 2 3 4", PARALLEL="2")
    assert done.returncode == 0, done.stderr
    calls = [json.loads(line) for line in (repo / "tools" / "calls.jsonl").read_text().splitlines()]
    assert "--warm-start-only" in calls[0]["args"] and "--report-only" in calls[-1]["args"]
    assert calls[-1]["seeds"] == ["0", "1", "2", "3", "4"]
    starts = {c["seeds"][0]: c["start"] for c in calls[1:-1] if "start" in c}
    ends = {c["seeds"][0]: c["end"] for c in calls if "end" in c}
    assert sorted(starts) == ["0", "1", "2", "3", "4"]
    for seed, start in starts.items():  # never more than two seeds at once
        assert sum(starts[s] <= start < ends[s] for s in starts) <= 2, seed
    assert min(starts["2"], starts["3"]) >= max(ends["0"], ends["1"])  # the second wave after the first


def test_the_comparison_names_a_failed_seed_and_rejects_a_bad_parallel(tmp_path: Path) -> None:
    repo = _fake_repo(tmp_path)
    failed = _run_compare(repo, SEEDS="0 1", PARALLEL="1", FAIL_SEED="1")
    assert failed.returncode == 1 and f"error: seed 1 failed; its log is {repo / 'out'}/seed1.log" in failed.stderr
    bad = _run_compare(repo, SEEDS="0", PARALLEL="two")
    assert bad.returncode == 1 and "PARALLEL must be a positive integer, got 'two'" in bad.stderr
