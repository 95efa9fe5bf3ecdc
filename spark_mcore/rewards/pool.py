"""`VerifierPool`: score many (verifier, response, answer) items with a per-item time limit.

num_workers == 0: items run one by one in this process through `run_check` (signal timer; only
enforced in the main thread, see timeout.py).
num_workers > 0: items run in `python -m spark_mcore.rewards._worker` subprocesses, one item per
worker at a time. A worker enforces the limit itself (signal timer); if it has not answered
`cfg.kill_grace_s` after the limit (a hang inside one C call) the pool SIGKILLs it, reaps it and
starts a replacement. Plain subprocesses rather than multiprocessing: no pickling, no
`__main__` re-import, no resource-tracker process, and a stuck worker can be killed alone.

Create, use and close a pool from one long-lived thread (the trainer's): workers are bound to
die with the thread that started them (Linux PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import importlib
import logging
import os
import selectors
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from spark_mcore.rewards._wire import encode_frame, split_frames
from spark_mcore.rewards.config import RewardConfig
from spark_mcore.rewards.math_verifier import warm_up
from spark_mcore.rewards.registry import get_verifier, registered_verifiers
from spark_mcore.rewards.timeout import run_check

logger = logging.getLogger(__name__)

Item = tuple[str, str, str]
# A fresh worker imports sympy + math-verify (~1 s); this only catches a broken interpreter.
_STARTUP_TIMEOUT_S = 120.0
_CLOSE_WAIT_S = 2.0
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class _Worker:
    """One worker subprocess and the item it is working on."""

    def __init__(self, hello: dict[str, Any]) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spark_mcore.rewards._worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
        )
        self.buf = bytearray()
        self.ready = False
        self.started = time.monotonic()
        self.index: int | None = None  # item being verified
        self.deadline = 0.0
        self.send(hello)

    @property
    def fd(self) -> int:
        assert self.proc.stdout is not None
        return self.proc.stdout.fileno()

    def send(self, obj: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(encode_frame(obj))
        self.proc.stdin.flush()

    def receive(self) -> list[Any] | None:
        """Frames now readable (call after the selector reports the fd); None on EOF (died)."""
        data = os.read(self.fd, 1 << 16)
        if not data:
            return None
        self.buf.extend(data)
        return split_frames(self.buf)

    def stop(self, kill: bool) -> None:
        """End the process and reap it. kill=False first lets it exit on stdin EOF."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass  # broken pipe: it is already gone
        if not kill:
            try:
                self.proc.wait(_CLOSE_WAIT_S)
            except subprocess.TimeoutExpired:
                kill = True
        if kill and self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class VerifierPool:
    """Scores items with registered verifiers, each within `cfg.timeout_s`.

    `score(items)` returns one reward per item, in order. An item that times out or fails
    (the verifier raised, returned a non-float, or its worker crashed) scores 0.0 and is counted
    in `stats`: {"items", "timeouts", "errors", "worker_restarts"}. Use as a context manager or
    call `close()`; workers are started in the constructor so their imports overlap other work.
    """

    def __init__(self, cfg: RewardConfig) -> None:
        if not isinstance(cfg, RewardConfig):
            raise TypeError(f"VerifierPool(cfg): expected RewardConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        for module in cfg.verifier_modules:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise ImportError(
                    f"reward.verifier_modules: cannot import {module!r} ({e}); "
                    "list importable module names that register verifiers"
                ) from e
        self.stats: dict[str, int] = {"items": 0, "timeouts": 0, "errors": 0, "worker_restarts": 0}
        self._hello = {
            "sys_path": list(sys.path),
            "modules": list(cfg.verifier_modules),
            "timeout_s": cfg.timeout_s,
        }
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._workers: list[_Worker] = []
        self._closed = False
        for _ in range(cfg.num_workers):
            self._start_worker()
        if cfg.num_workers == 0:
            warm_up()

    # -- public -----------------------------------------------------------------------------

    def score(self, items: Sequence[Item]) -> list[float]:
        """Rewards in [0, 1] for `items` = [(verifier_name, response, answer), ...], in order."""
        _validate_items(items)
        with self._lock:
            if self._closed:
                raise RuntimeError("VerifierPool.score() after close(); create a new pool")
            self.stats["items"] += len(items)
            if not self._workers:
                return [self._score_in_process(item) for item in items]
            return self._score_in_workers(items)

    def wait_ready(self, timeout_s: float = _STARTUP_TIMEOUT_S) -> None:
        """Block until every worker has imported its verifiers (~1 s each; a no-op in-process).
        `score` does not need this; it helps before timing-sensitive work. TimeoutError when
        a worker is not ready within `timeout_s`."""
        with self._lock:
            deadline = time.monotonic() + timeout_s
            while any(not w.ready for w in self._workers):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"verifier workers not ready after {timeout_s:.3g} s")
                for key, _ in self._selector.select(remaining):
                    self._on_readable(key.data, [])  # nothing is in flight: only "ready" frames

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for monitoring and tests)."""
        return [w.proc.pid for w in self._workers]

    def close(self) -> None:
        """Stop every worker and wait for it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            self._selector.unregister(worker.fd)
            # A busy or still-importing worker has nothing worth waiting for.
            worker.stop(kill=worker.index is not None or not worker.ready)
        self._workers.clear()
        self._selector.close()

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:  # interpreter shutdown: modules may already be torn down
                pass

    # -- internals --------------------------------------------------------------------------

    def _count(self, status: str) -> None:
        if status == "timeout":
            self.stats["timeouts"] += 1
        elif status == "error":
            self.stats["errors"] += 1

    def _score_in_process(self, item: Item) -> float:
        reward, status = run_check(*item, timeout_s=self.cfg.timeout_s)
        self._count(status)
        return reward

    def _start_worker(self) -> _Worker:
        worker = _Worker(self._hello)
        self._selector.register(worker.fd, selectors.EVENT_READ, worker)
        self._workers.append(worker)
        return worker

    def _replace(self, worker: _Worker, kill: bool) -> None:
        self._selector.unregister(worker.fd)
        self._workers.remove(worker)
        worker.stop(kill=kill)
        self.stats["worker_restarts"] += 1
        self._start_worker()

    def _score_in_workers(self, items: Sequence[Item]) -> list[float]:
        rewards = [0.0] * len(items)
        queue = deque(range(len(items)))
        try:
            while queue or any(w.index is not None for w in self._workers):
                for worker in self._workers:
                    if worker.ready and worker.index is None and queue:
                        self._dispatch(worker, queue.popleft(), items, rewards)
                for key, _ in self._selector.select(self._wait_time()):
                    self._on_readable(key.data, rewards)
                self._reap_overdue(rewards)
        except BaseException:
            # Interrupted (Ctrl-C, startup failure): a busy worker's late answer would otherwise
            # land on an item of the next call, so those workers are replaced.
            for worker in [w for w in self._workers if w.index is not None]:
                worker.index = None
                self._replace(worker, kill=True)
            raise
        return rewards

    def _dispatch(self, worker: _Worker, index: int, items: Sequence[Item], rewards: list[float]) -> None:
        name, response, answer = items[index]
        worker.index = index
        worker.deadline = time.monotonic() + self.cfg.timeout_s + self.cfg.kill_grace_s
        try:
            worker.send({"name": name, "response": response, "answer": answer})
        except OSError:  # it died between items: the item was never checked
            self._finish(worker, rewards, 0.0, "error")
            self._replace(worker, kill=True)

    def _wait_time(self) -> float:
        now = time.monotonic()
        deadlines = [w.deadline for w in self._workers if w.index is not None]
        deadlines += [w.started + _STARTUP_TIMEOUT_S for w in self._workers if not w.ready]
        return max(0.0, min(deadlines) - now) if deadlines else 0.05

    def _finish(self, worker: _Worker, rewards: list[float], reward: float, status: str) -> None:
        assert worker.index is not None
        rewards[worker.index] = reward
        self._count(status)
        worker.index = None

    def _on_readable(self, worker: _Worker, rewards: list[float]) -> None:
        frames = worker.receive()
        if frames is None:  # EOF: the worker died
            if not worker.ready:
                raise RuntimeError(
                    f"verifier worker {worker.proc.pid} exited during startup (code "
                    f"{worker.proc.wait()}); see its traceback on stderr"
                )
            logger.warning(
                "verifier worker %d died (code %s); restarting it", worker.proc.pid, worker.proc.wait()
            )
            if worker.index is not None:
                self._finish(worker, rewards, 0.0, "error")
            self._replace(worker, kill=True)
            return
        for frame in frames:
            if "error" in frame:
                raise RuntimeError(
                    f"verifier worker failed to start (check reward.verifier_modules):\n{frame['error']}"
                )
            if frame.get("ready"):
                worker.ready = True
            elif worker.index is not None:
                self._finish(worker, rewards, float(frame["reward"]), str(frame["status"]))

    def _reap_overdue(self, rewards: list[float]) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.index is not None and now >= worker.deadline:
                logger.warning(
                    "verifier worker %d overran %.3g s; killing it", worker.proc.pid, self.cfg.timeout_s
                )
                self._finish(worker, rewards, 0.0, "timeout")
                self._replace(worker, kill=True)
            elif not worker.ready and now - worker.started > _STARTUP_TIMEOUT_S:
                raise RuntimeError(
                    f"verifier worker {worker.proc.pid} not ready after {_STARTUP_TIMEOUT_S:.0f} s"
                )


def _validate_items(items: Sequence[Item]) -> None:
    if not isinstance(items, (list, tuple)):
        raise TypeError(
            f"VerifierPool.score(items): expected a list of (verifier, response, answer), got {type(items).__name__}"
        )
    known = set(registered_verifiers())
    for i, item in enumerate(items):
        if not isinstance(item, (list, tuple)) or len(item) != 3:
            raise TypeError(
                f"items[{i}]: expected a (verifier_name, response, answer) tuple, got {item!r:.80}"
            )
        for field, value in zip(("verifier_name", "response", "answer"), item, strict=True):
            if not isinstance(value, str):
                raise TypeError(
                    f"items[{i}].{field}: expected str, got {type(value).__name__}; convert it before scoring"
                )
        if item[0] not in known:
            get_verifier(item[0])  # raises KeyError listing the registered names
