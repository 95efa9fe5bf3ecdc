"""Faults during training, on the real loop in this process with real signals and files:

- SIGTERM during RL step 2 of 3 with checkpoint.save_interval=0: the step finishes, a checkpoint
  is written, `Interrupted` names it; the rerun resumes and ends with the metrics of an
  uninterrupted run.
- The newest checkpoint lost a file: the rerun warns, resumes from the one before, and again
  ends with the uninterrupted run's metrics.
- The disk fills during the final save (a small tmpfs): `DiskFullError` names the directory and
  the bytes needed, the partial directory is gone, eval_rl.json was written before.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

import spark_mcore.train as train_mod
from spark_mcore.checkpoint.io import list_checkpoints
from spark_mcore.config.run import load_run_config
from spark_mcore.errors import DiskFullError, Interrupted
from spark_mcore.rewards import register_verifier, registered_verifiers

VERIFIER = "faults_even_length"
if VERIFIER not in registered_verifiers():
    # a random tiny model never solves arithmetic: this verifier gives it ~50 % reward, so the
    # GRPO loss is not zero and comparing trajectories is not vacuous
    @register_verifier(VERIFIER)
    def _even_length(response: str, answer: str) -> float:
        return float(len(str(response)) % 2 == 0)


MICRO = [
    "model.hidden_size=32", "model.num_layers=2", "model.ffn_hidden_size=64", "data.prompts_per_step=4",
    "rollout.n=4", "rollout.max_new_tokens=8", "warmstart.steps=0", "trainer.steps=3",
    "trainer.micro_batch_size=16", "trainer.lr=0.001", "eval.max_new_tokens=8", "logging.progress=false",
    "logging.tensorboard=false", "checkpoint.export_hf=false", "checkpoint.keep_last=5",
]
TRAJECTORY = ["train/pg_loss", "train/kl", "train/grad_norm", "rollout/reward_mean", "rollout/response_len"]


def _config(tmp: Path, run_dir: Path, *extra: str):
    data = tmp / "data.jsonl"
    if not data.is_file():
        data.write_text("".join(json.dumps({"prompt": f"Say something {i}", "answer": "7", "task": VERIFIER}) + "\n"
                                for i in range(12)))
    return load_run_config(None, [*MICRO, f"data.source={data}", f"data.eval_source={data}",
                                  f"checkpoint.dir={run_dir}", *extra])


def _trajectory(run_dir: Path) -> dict[int, list[float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: [r.get(k) for k in TRAJECTORY] for r in rows}  # the last record per step wins


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """One 3-step run saving after every step: the reference trajectory, and checkpoints to damage."""
    tmp = tmp_path_factory.mktemp("faults")
    run_dir = tmp / "full"
    train_mod.train(_config(tmp, run_dir, "checkpoint.save_interval=1"))
    traj = _trajectory(run_dir)
    assert sorted(traj) == [1, 2, 3]
    assert any(v[2] != 0 for v in traj.values()), "no gradient: comparisons would be vacuous"
    backends = (run_dir / "backends.txt").read_text()  # TE / apex said once, here and in `doctor`
    assert "transformer-engine:" in backends and "apex:" in backends
    return run_dir


def test_sigterm_in_step_2_of_3_saves_and_resumes_to_the_same_metrics(uninterrupted: Path, monkeypatch,
                                                                        capsys) -> None:
    tmp = uninterrupted.parent
    run_dir = tmp / "sigterm"
    original, calls = train_mod.update, []

    def update_then_signal(run, groups, version, **kw):
        calls.append(version)
        if len(calls) == 2:  # in the middle of RL step 2 of 3: a real signal to this process
            os.kill(os.getpid(), signal.SIGTERM)
        original(run, groups, version, **kw)

    monkeypatch.setattr(train_mod, "update", update_then_signal)
    with pytest.raises(Interrupted) as info:
        train_mod.train(_config(tmp, run_dir, "checkpoint.save_interval=0"))
    monkeypatch.setattr(train_mod, "update", original)
    assert info.value.signame == "SIGTERM" and info.value.signum == signal.SIGTERM
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_2"]  # step 2 finished, then saved
    assert info.value.where == str(run_dir / "checkpoints" / "step_2")
    assert "after policy step 2/3" in str(info.value) and "run the same command again" in str(info.value)
    assert "SIGTERM received: finishing the current step" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    train_mod.train(_config(tmp, run_dir, "checkpoint.save_interval=0"))
    assert "resumed from" in capsys.readouterr().out
    assert _trajectory(run_dir) == _trajectory(uninterrupted)


def test_newest_checkpoint_missing_a_file_resumes_from_the_one_before(uninterrupted: Path, capsys) -> None:
    tmp = uninterrupted.parent
    run_dir = tmp / "damaged"
    run_dir.mkdir()
    # the finished run's files, minus the trainer state of its newest checkpoint
    subprocess.run(["cp", "-a", f"{uninterrupted}/.", str(run_dir)], check=True)
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in (
        uninterrupted / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 2))
    newest = run_dir / "checkpoints" / "step_3"
    victim = next(p for p in sorted((newest / "model").iterdir()) if p.suffix == ".distcp")
    victim.unlink()
    train_mod.train(_config(tmp, run_dir, "checkpoint.save_interval=1"))
    out = capsys.readouterr().out
    assert f"warning: skipping checkpoint {newest}: file model/{victim.name} is missing" in out
    assert f"resumed from {run_dir / 'checkpoints' / 'step_2'}" in out
    assert _trajectory(run_dir) == _trajectory(uninterrupted)


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    # ~230 KiB: the run's small files fit, a checkpoint (~700 KiB) does not
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=230k", "tmpfs", str(mnt)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_during_save_is_reported_and_cleaned_up(uninterrupted: Path, small_tmpfs: Path) -> None:
    run_dir = small_tmpfs / "run"
    with pytest.raises(DiskFullError) as info:
        train_mod.train(_config(uninterrupted.parent, run_dir, "trainer.steps=1", "checkpoint.save_interval=0"))
    msg = str(info.value)
    assert f"no space left on device while saving a checkpoint in {run_dir / 'checkpoints'}" in msg
    assert "bytes" in msg and "Fix:" in msg
    needed = int(msg.split("needs about ")[1].split(" bytes")[0])
    assert needed > 230 * 1024
    assert json.loads((run_dir / "eval_rl.json").read_text())["num_prompts"] > 0  # results kept
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "the partial checkpoint stayed on the full disk"
