"""The stream source with two trainer ranks (gloo, 127.0.0.1): global rank 0 owns the endpoint,
`RankZeroSource` gives every rank the step's groups, and each DP rank trains its own slice.

This is the contract of the in-process path (`rollout.divide.DividedRollout`): every rank holds
all of the step's groups in the same order (each builds the same GRPO batch and SPARK state),
then `dp_slice` gives DP rank d its part. Checked here at DP2 (each rank trains its half, the
halves are disjoint and together are the step: every prompt's responses exactly once) and at
TP2 (one replica: both ranks train the same, whole step). A worker thread on rank 0 answers
the assignments over real ZeroMQ; rows carry their prompt and response in their token ids.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from spark_mcore.rollout.base import SamplingParams
from spark_mcore.rollout.source import RankZeroSource, StepRequest, StreamSource
from spark_mcore.trainer.batching import dp_slice, groups_to_batch
from spark_mcore.transport.config import StreamConfig
from spark_mcore.transport.endpoint import StreamEndpoint
from spark_mcore.transport.protocol import WorkResult
from spark_mcore.transport.worker_client import WorkerClient
from spark_mcore.types import Completion, Prompt

pytestmark = pytest.mark.timeout(120)
N, PROMPTS, STEPS = 4, 5, 2  # 5 prompts x 4 responses = 20 rows: groups straddle the DP halves


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answer(connect: str, stop: threading.Event) -> None:
    """A rollout worker: prompt ids [1000 + k] for prompt pk, response j = tokens [2000 + j, 7]."""
    client = WorkerClient(connect, "w0", capacity=4, heartbeat_s=0.2)
    try:
        while not client.trainer_done and not stop.is_set():
            for item in client.poll(50):
                k, n = int(item.prompt.id[1:]), item.params["n"]
                comps = [Completion([2000 + j, 7], f"r{j}", [-0.5, -0.25], "stop") for j in range(n)]
                client.send_result(WorkResult(item.sample_id, "w0", client.policy_version, [1000 + k], comps,
                                              [float(j % 2) for j in range(n)]))
    finally:
        client.close()


def _rows(batch, dp_rank: int, dp_size: int) -> list[list[int]]:
    """(prompt number, response index) of the rows DP rank `dp_rank` trains (padding excluded)."""
    part = dp_slice(batch, dp_rank, dp_size)
    return [[int(t[0]) - 1000, int(t[1]) - 2000] for t, m in zip(part.tokens, part.loss_mask, strict=True)
            if float(m.sum()) > 0]


def _rank(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    stop = threading.Event()
    inner, worker = None, None
    if rank == 0:
        prompts = [Prompt(f"p{k}", [{"role": "user", "content": f"q{k}"}], str(k)) for k in range(PROMPTS * STEPS)]
        batches = iter([prompts[s * PROMPTS:(s + 1) * PROMPTS] for s in range(STEPS)])
        endpoint = StreamEndpoint(StreamConfig(bind="tcp://127.0.0.1:0", heartbeat_s=0.2, worker_timeout_s=2.0,
                                               credits_per_worker=4, stall_timeout_s=60.0))
        inner = StreamSource(endpoint, batches)
        worker = threading.Thread(target=_answer, args=(endpoint.endpoint, stop), daemon=True)
        worker.start()
    source = RankZeroSource(inner, rank)
    record = []
    try:
        for step in range(STEPS):
            got = source.collect(StepRequest(step, step, True, [], SamplingParams(n=N, temperature=1.0, seed=1)))
            batch, _ = groups_to_batch(got.groups, 1e-6, True, False)
            record.append({"groups": [g.prompt.id for g in got.groups],
                           "rewards": [[r.reward for r in g.rollouts] for g in got.groups],
                           "dp2": _rows(batch, rank, 2), "tp2": _rows(batch, 0, 1)})
            source.weights_pushed(step + 1)
    finally:
        stop.set()
        source.close()
        if worker is not None:
            worker.join(timeout=10)
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))


def test_each_dp_rank_trains_its_half_and_the_halves_are_the_step(tmp_path: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    seen: Counter = Counter()
    for step, (a, b) in enumerate(zip(r0, r1, strict=True)):
        expected = [f"p{k}" for k in range(step * PROMPTS, (step + 1) * PROMPTS)]
        # every rank holds the whole step, in the loader's order (the same GRPO batch everywhere)
        assert a["groups"] == b["groups"] == expected and a["rewards"] == b["rewards"]
        step_rows = sorted([k, j] for k in range(step * PROMPTS, (step + 1) * PROMPTS) for j in range(N))
        # DP2: each rank trains its own half; the halves are disjoint and together are the step
        assert len(a["dp2"]) == len(b["dp2"]) == PROMPTS * N // 2
        assert not {tuple(r) for r in a["dp2"]} & {tuple(r) for r in b["dp2"]}
        assert sorted(a["dp2"] + b["dp2"]) == step_rows
        # TP2 (one DP replica): both ranks train the same, whole step
        assert sorted(a["tp2"]) == sorted(b["tp2"]) == step_rows
        seen.update(k for k, _ in a["dp2"] + b["dp2"])
    # each prompt of the run trained exactly once (its N responses, in one step)
    assert seen == Counter({k: N for k in range(PROMPTS * STEPS)})
