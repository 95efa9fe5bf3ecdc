"""Rollout workers as real processes on 127.0.0.1 feeding the trainer's stream source.

Three `spark-mcore rollout-worker` processes (scripted engine, so the engine is not what is
tested); one is SIGKILLed while it holds assignments and started again. Every prompt the
loader handed out reaches exactly one step's groups, in the loader's order; the log names
the worker whose prompts were re-assigned. With no worker alive the trainer does not wait
forever: StreamStalled names the silent worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

import pytest
from stream_helpers import Workers, free_port, worker_config

from spark_mcore.config.run import load_run_config
from spark_mcore.data.dataset import PromptLoader, load_prompts
from spark_mcore.data.tokenizer import get_tokenizer
from spark_mcore.rollout.base import SamplingParams
from spark_mcore.rollout.source import StepRequest, StreamSource
from spark_mcore.transport.config import StreamConfig
from spark_mcore.transport.endpoint import StreamEndpoint, StreamStalled

pytestmark = pytest.mark.timeout(120)
STEPS = 6


def _source(run_dir, cfg, max_staleness: int | None, stall_s: float = 60.0) -> tuple[StreamSource, list]:
    tok = get_tokenizer(cfg.data, run_dir)
    prompts = load_prompts(cfg.data, "train", tok)
    loader = PromptLoader(prompts, cfg.data.prompts_per_step, seed=0)
    order = PromptLoader(prompts, cfg.data.prompts_per_step, seed=0)  # what the loader hands out, in order
    scfg = StreamConfig(bind=f"tcp://127.0.0.1:{free_port()}", heartbeat_s=0.2, worker_timeout_s=2.0,
                        credits_per_worker=4, stall_timeout_s=stall_s)
    return StreamSource(StreamEndpoint(scfg, max_staleness=max_staleness), loader, max_staleness=max_staleness), order


def _request(step: int) -> StepRequest:
    return StepRequest(iteration=step, policy_step=step, policy=True, reward_prompts=[],
                       params=SamplingParams(n=4, max_new_tokens=8, seed=step))


def test_three_workers_one_killed_and_restarted_every_prompt_once(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="spark_mcore.transport.endpoint")
    config = worker_config(tmp_path)
    cfg = load_run_config(config)
    source, order = _source(tmp_path, cfg, max_staleness=1)  # async: the next batch is assigned early
    seen: list[str] = []
    try:
        with Workers(source.endpoint.endpoint, config, tmp_path, delay_s=0.5) as workers:
            for name in ("w0", "w1", "w2"):
                workers.start(name)
            def kill_w1_once_it_holds_work() -> None:
                deadline = time.monotonic() + 60
                while source.endpoint.in_flight().get("w1", 0) == 0 and time.monotonic() < deadline:
                    time.sleep(0.01)
                workers.kill("w1")  # SIGKILL while it holds assignments

            killer = threading.Thread(target=kill_w1_once_it_holds_work)
            killer.start()
            for step in range(STEPS):
                if step == 3:
                    killer.join()
                    workers.start("w1")
                out = source.collect(_request(step))
                assert len(out.groups) == cfg.data.prompts_per_step
                assert all(len(g.rollouts) == 4 for g in out.groups)
                assert out.candidates is not None and len(out.candidates) == len(out.groups)
                assert all(c.source_prompt_id == g.prompt.id for g, cs in zip(out.groups, out.candidates, strict=True)
                           for c in cs), "recycled tasks belong to their group"
                seen += [g.prompt.id for g in out.groups]
                source.prefetch(True, [])  # the next step's batch goes out while this one "trains"
            stats = source.endpoint.stats
    finally:
        source.close()
    expected = [p.id for _ in range(STEPS) for p in next(order)]
    assert seen == expected, "every prompt handed out reaches exactly one step, in order"
    assert not [k for k, v in Counter(seen).items() if v > 1 and expected.count(k) == 1]
    assert stats.reassigned > 0
    assert any("worker 'w1'" in r.getMessage() and "re-assigning" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]


def test_trainer_never_waits_forever_names_the_silent_worker(tmp_path) -> None:
    config = worker_config(tmp_path)
    cfg = load_run_config(config)
    source, _ = _source(tmp_path, cfg, max_staleness=None, stall_s=4.0)
    try:
        with Workers(source.endpoint.endpoint, config, tmp_path, delay_s=15.0) as workers:
            workers.start("slowpoke")  # takes its prompts, then generates far longer than the deadline
            deadline = time.monotonic() + 60
            while "slowpoke" not in source.endpoint.workers:  # the deadline is about results, not start-up
                assert time.monotonic() < deadline, "worker never connected"
                time.sleep(0.05)
            start = time.monotonic()
            with pytest.raises(StreamStalled, match="slowpoke"):
                source.collect(_request(0))
            assert time.monotonic() - start < 30
    finally:
        source.close()
