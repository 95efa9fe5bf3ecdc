"""Resume with work in flight: the trainer (async mode, prompts of the next step assigned ahead)
is SIGKILLed after a checkpoint while rollout workers hold its assignments; it is started again
and the run completes. In the surviving lineage every prompt is trained exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from stream_helpers import REPO, Workers, free_port, worker_config

from spark_mcore.checkpoint.io import list_checkpoints

# ~60 s on 2 idle cores: two trainer start-ups, two workers, megatron checkpoints
pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
STEPS = 3
PROMPTS = 4 * STEPS

# Records which prompts each iteration trained on (the last record per iteration is the one
# of the lineage that survived the kill).
RUNNER = textwrap.dedent("""
    import json, sys
    import spark_mcore.train as t

    original = t.update
    def recording_update(run, groups, version, **kw):
        with open(run.run_dir / "trained.jsonl", "a") as f:
            f.write(json.dumps({"it": version - 1, "prompts": [g.prompt.id for g in groups]}) + "\\n")
        return original(run, groups, version, **kw)
    t.update = recording_update
    if __name__ == "__main__":
        from spark_mcore.cli import main
        sys.exit(main(sys.argv[1:]))
""")


def _train_cmd(tmp: Path, run_dir: Path, config: Path, port: int) -> list[str]:
    (tmp / "runner.py").write_text(RUNNER)
    sets = ["model.hidden_size=32", "model.num_layers=2", "model.ffn_hidden_size=64", "warmstart.steps=0",
            f"trainer.steps={STEPS}", "trainer.micro_batch_size=8", "eval.max_new_tokens=4", "data.test_size=2",
            "rollout.engine=hf", "rollout.source=stream", "rollout.mode=async", "rollout.max_staleness=1",
            f"transport.bind=tcp://127.0.0.1:{port}", "checkpoint.save_interval=1", "checkpoint.keep_last=5",
            "checkpoint.export_hf=false", f"data.train_size={PROMPTS}"]
    return [sys.executable, str(tmp / "runner.py"), "train", "--config", str(config),
            *[a for kv in sets for a in ("--set", kv)]]


def test_trainer_killed_with_assignments_in_flight_resumes_without_loss_or_repeats(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = worker_config(run_dir, {"data": {"train_size": PROMPTS}, "spark": {"enabled": False},
                                     "transport": {"worker_timeout_s": 3.0}})
    port = free_port()
    cmd = _train_cmd(tmp_path, run_dir, config, port)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = open(tmp_path / "trainer.log", "a")  # noqa: SIM115
    with Workers(f"tcp://127.0.0.1:{port}", config, tmp_path, delay_s=0.2) as workers:
        for name in ("w0", "w1"):
            workers.start(name)
        first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while len(list_checkpoints(run_dir)) < 1:
                assert first.poll() is None, (tmp_path / "trainer.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint in time"
                time.sleep(0.02)
            os.killpg(first.pid, signal.SIGKILL)
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        saved = json.loads((list_checkpoints(run_dir)[-1] / "trainer_state.json").read_text())
        second = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=300)
        assert second.returncode == 0, (tmp_path / "trainer.log").read_text()[-3000:]
    text = (tmp_path / "trainer.log").read_text()
    assert "resumed from" in text
    lineage: dict[int, list[str]] = {}
    for line in (run_dir / "trained.jsonl").read_text().splitlines():
        rec = json.loads(line)
        lineage[rec["it"]] = rec["prompts"]  # a resumed iteration replaces the killed run's record
    assert sorted(lineage) == list(range(STEPS))
    trained = [p for it in sorted(lineage) for p in lineage[it]]
    assert len(trained) == PROMPTS and len(set(trained)) == PROMPTS, "every prompt trained exactly once"
    assert saved["source"]["batches"], "the checkpoint that was resumed held assignments in flight"
