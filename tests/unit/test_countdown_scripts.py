"""examples/countdown_warm_start.sh and countdown_compare.sh (issue 15): both parse, and every
setting a stage of the warm-start chain passes is one the run config accepts, so a typo fails
here in a second instead of an hour into the chain."""

from __future__ import annotations

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
