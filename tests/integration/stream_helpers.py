"""Shared pieces of the rollout-stream integration tests: a run directory with its tokenizer,
a worker config, and `spark-mcore rollout-worker` processes that are always cleaned up."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_config(run_dir: Path, extra: dict | None = None) -> Path:
    """A run file for scripted-engine workers; builds the run's tokenizer first (as a trainer
    would) so that workers only load it."""
    from spark_mcore.config.run import load_run_config
    from spark_mcore.data.tokenizer import get_tokenizer
    from spark_mcore.spark.templates import corpus_texts

    cfg = {"data": {"source": "builtin:arith", "train_size": 200, "test_size": 8, "prompts_per_step": 4},
           "rollout": {"engine": "scripted", "n": 4, "max_new_tokens": 8},
           "spark": {"enabled": True},
           "transport": {"heartbeat_s": 0.2, "worker_timeout_s": 2.0, "credits_per_worker": 4},
           "checkpoint": {"dir": str(run_dir)}, "logging": {"tensorboard": False, "progress": False}}
    for section, values in (extra or {}).items():
        cfg.setdefault(section, {}).update(values)
    path = run_dir / "worker.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    get_tokenizer(load_run_config(path).data, run_dir, extra_corpus=corpus_texts())
    return path


class Workers:
    """Starts and always stops `spark-mcore rollout-worker` processes (own process groups)."""

    def __init__(self, connect: str, config: Path, log_dir: Path, delay_s: float = 0.0) -> None:
        self.connect, self.config, self.log_dir = connect, config, log_dir
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "SPARK_SCRIPTED_DELAY_S": str(delay_s)}
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "a")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen([sys.executable, "-m", "spark_mcore.cli", "rollout-worker", "--connect", self.connect,
                                 "--config", str(self.config), "--name", name],
                                stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO, start_new_session=True)
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text()

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
