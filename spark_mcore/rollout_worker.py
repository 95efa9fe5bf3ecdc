"""`spark-mcore rollout-worker --connect tcp://HOST:PORT --config RUN.yaml`: a rollout worker.

It owns an engine client, a verifier pool and a SPARK recycler; it takes prompt assignments
from the trainer's stream endpoint, generates n responses each, verifies them, recycles policy
groups into judge / reflection candidates, and streams each verified group back with its
policy version and the engine's per-token log-probs. It keeps no state a resume needs: kill it
any time, start it again, and the trainer re-assigns what it never returned.

Threads: the main thread owns the ZeroMQ socket (assignments, acks, heartbeats while a long
generate call runs); one generation thread runs engine + verifiers + recycler on batches.
Engines (`rollout.engine`): "sglang" attaches to `sglang.urls` (the servers the trainer pushes
weights to; the worker never launches them), "hf" loads `model.hf_path` in-process (fixed
weights), "scripted" is the model-free test engine.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from spark_mcore.config.loader import ConfigError
from spark_mcore.config.run import RunConfig
from spark_mcore.data.chat import encode_prompt, stop_token_ids
from spark_mcore.data.tokenizer import get_tokenizer
from spark_mcore.rewards import VerifierPool
from spark_mcore.rollout.base import RolloutEngine, SamplingParams
from spark_mcore.rollout.groups import generate_groups, score_groups
from spark_mcore.spark.recycler import Recycler
from spark_mcore.spark.templates import corpus_texts
from spark_mcore.transport.malloc import keep_freed_memory
from spark_mcore.transport.protocol import WorkItem, WorkResult
from spark_mcore.transport.worker_client import WorkerClient

logger = logging.getLogger(__name__)


def _sglang(cfg: RunConfig, tokenizer: Any) -> RolloutEngine:
    from spark_mcore.rollout.sglang_engine import SGLangEngine

    if not cfg.sglang.urls:
        raise ConfigError("rollout-worker with rollout.engine=sglang needs sglang.urls: the servers the trainer "
                          "pushes weights to (workers never launch servers). Fix: --set sglang.urls=[http://HOST:PORT]")
    return SGLangEngine(cfg.sglang)


def _hf(cfg: RunConfig, tokenizer: Any) -> RolloutEngine:
    from spark_mcore.rollout.hf_engine import HFEngine

    if not cfg.model.hf_path:
        raise ConfigError("rollout-worker with rollout.engine=hf needs model.hf_path (an HF directory)")
    return HFEngine.from_pretrained(cfg.model.hf_path, decode=partial(tokenizer.decode, skip_special_tokens=True),
                                    pad_token_id=tokenizer.pad_token_id or 0)


def _scripted(cfg: RunConfig, tokenizer: Any) -> RolloutEngine:
    from spark_mcore.rollout.scripted import ScriptedEngine

    return ScriptedEngine(vocab_size=len(tokenizer))


WORKER_ENGINES: dict[str, Callable[[RunConfig, Any], RolloutEngine]] = {
    "sglang": _sglang, "hf": _hf, "scripted": _scripted}


class _Generator:
    """Engine + verifiers + recycler; built lazily on the first assignment (by then the trainer
    has written the run's tokenizer, which the worker loads)."""

    def __init__(self, cfg: RunConfig, worker: str) -> None:
        if cfg.rollout.engine not in WORKER_ENGINES:
            raise ConfigError(f"rollout.engine={cfg.rollout.engine!r} cannot run in a rollout worker; "
                              f"choose one of {sorted(WORKER_ENGINES)}")
        self.cfg, self.worker = cfg, worker
        self.tokenizer = get_tokenizer(cfg.data, Path(cfg.checkpoint.dir), extra_corpus=corpus_texts())
        self.engine = WORKER_ENGINES[cfg.rollout.engine](cfg, self.tokenizer)
        self.pool = VerifierPool(cfg.reward)
        self.recycler = Recycler(cfg.spark)
        if cfg.model.vision is not None:  # vision-language: ids with the expanded image pads, as the trainer's
            from spark_mcore.data.vision_prompts import vision_prompt_encoder

            self.encode: Callable[..., list[int]] = vision_prompt_encoder(self.tokenizer, cfg.model.vision, cfg.data)
        else:
            self.encode = partial(encode_prompt, self.tokenizer)
        self.stop_ids = stop_token_ids(self.tokenizer)

    def run(self, items: list[WorkItem], version: int) -> list[WorkResult]:
        """One batch of items with equal sampling parameters."""
        p = items[0].params
        params = SamplingParams(n=p["n"], temperature=p["temperature"], top_p=p["top_p"],
                                max_new_tokens=p["max_new_tokens"], seed=p.get("seed"),
                                stop_token_ids=list(p.get("stop_token_ids") or self.stop_ids))
        start = time.perf_counter()
        groups = generate_groups(self.engine, [i.prompt for i in items], self.encode, params)
        score_groups(groups, self.pool.score)
        took = (time.perf_counter() - start) / len(items)
        out = []
        for item, g in zip(items, groups, strict=True):
            for r in g.rollouts:
                r.policy_version = version  # the version the engines served when generation started
            cands = self.recycler.candidates(g, item.step, item.index) if item.recycle else []
            out.append(WorkResult(item.sample_id, self.worker, version, g.rollouts[0].prompt_ids if g.rollouts else [],
                                  [r.completion for r in g.rollouts], [r.reward for r in g.rollouts], cands, took))
        return out

    def close(self) -> None:
        self.pool.close()
        self.engine.shutdown()


def _batches(items: list[WorkItem]) -> list[list[WorkItem]]:
    by_params: dict[str, list[WorkItem]] = {}
    for it in items:
        key = repr(sorted((k, v) for k, v in it.params.items() if k != "seed"))
        by_params.setdefault(key, []).append(it)
    return list(by_params.values())


class _IdleClock:
    """Seconds the generation thread has waited for work (read by the main thread for heartbeats)."""

    def __init__(self) -> None:
        self._done = 0.0
        self._since: float | None = None

    def wait(self) -> None:
        self._since = time.monotonic()

    def work(self) -> None:
        since, self._since = self._since, None
        if since is not None:
            self._done += time.monotonic() - since

    def total(self) -> float:
        since = self._since  # (one read: the generation thread may clear it meanwhile)
        return self._done + (time.monotonic() - since if since is not None else 0.0)


@dataclass
class _TrainerWatch:
    """Says when the worker first hears from a trainer (and from a restarted one), and until the
    first word, that it is still waiting and what to check: a worker started before its trainer,
    or pointed at a wrong address or key, would otherwise wait without a word (ZeroMQ retries the
    connection silently)."""

    connect: str
    started: float
    notice_after_s: float = 10.0  # then 30, 90, 150, ... s: every minute at most
    session: str = ""

    def update(self, client: WorkerClient, now: float) -> None:
        if client.session and client.session != self.session:
            what = "connected to the trainer" if not self.session else "the trainer restarted"
            print(f"rollout worker {client.worker}: {what} (session {client.session}, policy version "
                  f"{client.policy_version})", flush=True)
            self.session = client.session
        elif not client.session and now - self.started >= self.notice_after_s:
            print(f"rollout worker {client.worker}: no answer from a trainer at {self.connect} for "
                  f"{now - self.started:.0f}s; still trying. Check that `spark-mcore train` runs with "
                  "rollout.source: stream at that address (it writes it to <checkpoint.dir>/stream_endpoint) "
                  "and, with CURVE, that transport.curve_public_key is the trainer's", flush=True)
            self.notice_after_s += min(60.0, 2 * self.notice_after_s)


def run_worker(connect: str, cfg: RunConfig, name: str | None = None, capacity: int | None = None,
               stop: threading.Event | None = None) -> int:
    """Serves the trainer at `connect` until `stop` is set (SIGTERM / SIGINT set it too)."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    keep_freed_memory(cfg.transport.malloc_keep_mb)  # (process-wide; see transport/malloc.py)
    client = WorkerClient(connect, name, capacity or cfg.transport.credits_per_worker, cfg.transport.heartbeat_s,
                          cfg.transport.curve_public_key, cfg.transport.high_water_mark, cfg.transport.max_message_bytes,
                          cfg.transport.batch_max_results, cfg.transport.batch_max_bytes, cfg.transport.batch_alone_bytes)
    todo: queue.Queue[tuple[list[WorkItem], int] | None] = queue.Queue()
    done: queue.Queue[list[WorkResult] | BaseException] = queue.Queue()
    gen: list[_Generator] = []

    idle = _IdleClock()

    def generate_loop() -> None:
        while True:
            idle.wait()
            job = todo.get()
            idle.work()
            if job is None:
                return
            try:
                if not gen:
                    gen.append(_Generator(cfg, client.worker))
                done.put(gen[0].run(*job))
            except BaseException as e:  # reported by the main thread, which stops the worker
                done.put(e)
                return

    thread = threading.Thread(target=generate_loop, name="generate", daemon=True)
    thread.start()
    print(f"rollout worker {client.worker} connecting to {connect}", flush=True)
    watch = _TrainerWatch(connect, time.monotonic())
    try:
        while not stop.is_set() and not client.trainer_done:
            client.idle_s = round(idle.total(), 3)
            items = client.poll(50)
            watch.update(client, time.monotonic())
            for batch in _batches(items):
                todo.put((batch, client.policy_version))
            ready: list[WorkResult] = []
            while not done.empty():
                out = done.get()
                if isinstance(out, BaseException):
                    raise out
                ready += out
            if ready:  # what finished since the last look, in as few messages as the caps allow
                client.send_results(ready)
        if client.trainer_done:
            print(f"rollout worker {client.worker}: the trainer finished its run; exiting", flush=True)
        return 0
    finally:
        todo.put(None)
        thread.join(timeout=2)  # a generate call in progress is abandoned (daemon thread)
        client.close()
        if gen:
            gen[0].close()


__all__ = ["run_worker", "WORKER_ENGINES"]
