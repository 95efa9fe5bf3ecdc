"""Signals from outside and SIGKILL, against `python -m spark_mcore.cli train` processes:

1. SIGTERM from outside: the run finishes its step, saves, exits 143 with one line saying where;
   stderr holds no traceback and none of megatron's TE/Apex warnings.
2. The same run resumed, then SIGKILLed after it saved: megatron's checkpoint writer helper
   and multiprocessing's resource tracker die with it (no orphans).
3. SIGTERM during the SFT warm start: it stops after the current step too, saving nothing.
4. The mechanism alone (no torch): a spawn-context Manager outlives a SIGKILLed parent unless
   `die_with_parent()` was called, so test 2 can fail; and `dies_with_this_process()`, the same
   for `subprocess` children.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from spark_mcore.checkpoint.io import list_checkpoints

MICRO = [
    "model.hidden_size=32", "model.num_layers=2", "model.ffn_hidden_size=64", "data.prompts_per_step=4",
    "data.train_size=64", "data.test_size=4", "data.levels=[1]", "rollout.n=4", "rollout.max_new_tokens=8",
    "warmstart.steps=0", "trainer.steps=50", "trainer.micro_batch_size=16", "eval.max_new_tokens=8",
    "logging.progress=false", "logging.tensorboard=false", "checkpoint.export_hf=false", "checkpoint.keep_last=5",
]


def _cmd(run_dir: Path, *extra: str) -> list[str]:
    sets = [a for kv in [*MICRO, f"checkpoint.dir={run_dir}", *extra] for a in ("--set", kv)]
    return [sys.executable, "-m", "spark_mcore.cli", "train", *sets]


def _wait(cond, proc: subprocess.Popen | None, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                kids = {int(k) for k in (task / "children").read_text().split()}
                todo.extend(kids - out)
                out |= kids
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return 0


def _kill_all(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _kill_then_gone(proc: subprocess.Popen, pids: set[int], what: str) -> None:
    """SIGKILLs `proc`, then waits (30 s at most) until none of `pids` is alive."""
    proc.kill()
    proc.wait(timeout=30)
    _wait(lambda: not any(_alive(p) for p in pids), None, what, timeout=30)


def _sigterm_once(cmd: list[str], out: Path, err: Path, ready: str) -> int:
    """Starts `cmd` (stdout -> out, stderr -> err), sends SIGTERM once `ready` is in its stdout,
    returns its exit code; its process group is killed whatever happens."""
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen(cmd, stdout=o, stderr=e, start_new_session=True)
    try:
        _wait(lambda: ready in out.read_text(), proc, repr(ready))
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_sigterm_then_sigkill_from_outside(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    assert _sigterm_once(_cmd(run_dir, "checkpoint.save_interval=0"), out, err, "[policy step 1,") == 128 + signal.SIGTERM
    stderr = err.read_text()
    assert "Traceback" not in stderr and "Warning" not in stderr, stderr
    saved = list_checkpoints(run_dir)
    assert len(saved) == 1 and (saved[0] / "manifest.json").is_file()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[0].startswith("SIGTERM received: finishing the current step")
    assert lines[-1].startswith(f"stopped by SIGTERM after policy step {saved[0].name[5:]}/50: saved checkpoint "
                                f"{saved[0]}; run the same command again to resume"), lines
    assert len(lines) == 2, lines

    # resumed; SIGKILL once it saved again: its helpers must not outlive it
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen(_cmd(run_dir, "checkpoint.save_interval=1"), stdout=o, stderr=e,
                                start_new_session=True)
    helpers: set[int] = set()
    try:
        _wait(lambda: len(list_checkpoints(run_dir)) >= 2, proc, "a checkpoint after the resume")
        assert "resumed from" in out.read_text()
        helpers = _descendants(proc.pid)
        cmdlines = [Path(f"/proc/{p}/cmdline").read_bytes() for p in helpers if _alive(p)]
        assert any(b"multiprocessing" in c for c in cmdlines), "megatron's writer helper was not seen"
        _kill_then_gone(proc, helpers, "the helpers to exit")
    finally:
        _kill_all(helpers)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)



def test_sigterm_during_the_warm_start_stops_after_its_current_step(tmp_path: Path) -> None:
    """A long SFT warm start acts on SIGTERM too (it used to train on to its last step): it stops
    after the current step, exits 143 and says that no checkpoint was written."""
    run_dir = tmp_path / "run"
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    cmd = _cmd(run_dir, "warmstart.steps=100000", "warmstart.judge_fraction=0", "warmstart.batch_size=4")
    assert _sigterm_once(cmd, out, err, "warm start step 100/100000") == 128 + signal.SIGTERM
    lines = [line for line in err.read_text().splitlines() if line.strip()]
    assert lines[0].startswith("SIGTERM received: finishing the current step") and len(lines) == 2, lines
    assert re.fullmatch(r"stopped by SIGTERM during the warm start, after SFT step (\d+)/100000 \(the warm start "
                        r"keeps no checkpoint: the same command starts it again\): no checkpoint was written",
                        lines[1]), lines
    assert not list_checkpoints(run_dir) and "RL policy" not in out.read_text()


PARENT = textwrap.dedent("""
    import multiprocessing as mp, os, sys, time
    if __name__ == "__main__":
        if sys.argv[1] == "fixed":
            from spark_mcore.distributed.orphans import die_with_parent
            die_with_parent()
        manager = mp.get_context("spawn").Manager()  # what megatron's checkpoint writer starts
        queue = manager.Queue()
        print(manager._process.pid, flush=True)
        time.sleep(600)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
@pytest.mark.parametrize("variant", ["control", "fixed"])
def test_spawn_helpers_die_with_a_sigkilled_parent(tmp_path: Path, variant: str) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    proc = subprocess.Popen([sys.executable, str(script), variant], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    helpers: set[int] = set()
    try:
        helper = int(proc.stdout.readline())
        helpers = _descendants(proc.pid) | {helper}
        if variant == "fixed":
            _kill_then_gone(proc, helpers, "the helpers to exit")
        else:  # without the fix the manager is orphaned (re-parented, alive): what the fix is for
            proc.kill()
            proc.wait(timeout=30)
            _wait(lambda: not _alive(helper) or _ppid(helper) != proc.pid, None, "the re-parenting", timeout=30)
            assert _alive(helper), "the control did not reproduce the orphan"
    finally:
        _kill_all(helpers)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stdout.close()


RUNNER = textwrap.dedent("""
    import subprocess, sys, time
    from spark_mcore.distributed.orphans import dies_with_this_process
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                             preexec_fn=dies_with_this_process())
    print(child.pid, flush=True)
    time.sleep(600)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_run_started_with_dies_with_this_process_stops_with_its_killed_parent(tmp_path: Path) -> None:
    """How tools/compare_spark_grpo.py starts its training runs: stopping the tool stops them."""
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    child: set[int] = set()
    try:
        child = {int(proc.stdout.readline())}
        _kill_then_gone(proc, child, "the run to exit")
    finally:
        _kill_all(child)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stdout.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_child_whose_maker_is_not_its_parent_exits_before_exec(monkeypatch) -> None:
    """The race `dies_with_this_process` closes: the parent died between fork and prctl, so the
    child was adopted (by init or a subreaper, whose PID need not be 1). Simulated by a maker PID
    that is not the child's parent: the child must exit 1 without running its program."""
    from spark_mcore.distributed import orphans

    monkeypatch.setattr(orphans.os, "getpid", lambda: 1)  # read once, when the preexec_fn is made
    preexec = orphans.dies_with_this_process()
    monkeypatch.undo()
    proc = subprocess.run([sys.executable, "-c", "print('ran')"], preexec_fn=preexec, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and "ran" not in proc.stdout
    ok = subprocess.run([sys.executable, "-c", "print('ran')"], preexec_fn=orphans.dies_with_this_process(),
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.strip() == "ran"
