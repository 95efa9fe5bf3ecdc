"""Launching `spark-mcore train` from the integration tests: one process, or torchrun (gloo) with
`nproc` ranks on a free port, through a test's runner script (which patches hooks that record what
each rank did into `$RECORD_DIR`, then calls `spark_mcore.cli.main`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from spark_mcore.distributed.parallel import find_free_port


def as_sets(overrides: Sequence[str]) -> list[str]:
    """`a.b=v` overrides as CLI arguments: `--set a.b=v --set ...`."""
    return [arg for kv in overrides for arg in ("--set", kv)]


def launch_train(runner: Path, nproc: int, overrides: Sequence[str], *, record: Path,
                 config: Path | None = None, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    """Runs `runner train [--config config] --set ...` on `nproc` ranks and asserts it exits 0
    (the message carries the tails of stdout and stderr). `record` is created and passed to the
    runner as RECORD_DIR. The run gets its own session, so a timeout takes no test process along;
    torchrun tears its workers down itself when one fails."""
    record.mkdir(parents=True, exist_ok=True)
    config_args = ["--config", str(config)] if config is not None else []
    args = [str(runner), "train", *config_args, *as_sets(overrides)]
    cmd = [sys.executable, *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(find_free_port()), *args]
    env = {**os.environ, "RECORD_DIR": str(record), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, start_new_session=True)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """The run's `metrics.jsonl` records, in order."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read_ranks(record: Path, nproc: int) -> list:  # type: ignore[type-arg]
    """What each rank's runner wrote to `record/rank{r}.json`, by rank."""
    return [json.loads((record / f"rank{r}.json").read_text()) for r in range(nproc)]
