"""Two real test-server processes; one is SIGKILLed in the middle of a batch.

The client must report the dead server with the tail of its log, the surviving server must
finish the batch, and no sample may be lost or changed: every sample of the batch equals what
the survivor generates for it alone afterwards (greedy decoding, same checkpoint).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from spark_mcore.rollout.base import SamplingParams
from spark_mcore.rollout.sglang_engine import SGLangEngine
from spark_mcore.sglang.client import ServerHandle, SGLangConfig, launch_servers
from spark_mcore.twin.server import TWIN_SERVER_COMMAND

pytestmark = pytest.mark.slow  # ~30 s on 2 shared cores (2 server processes)

VOCAB = 64
PROMPTS = [[i + 1, (3 * i) % 50 + 2, 7] for i in range(10)]
PARAMS = SamplingParams(n=1, temperature=0.0, max_new_tokens=4)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerHandle]]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tmp = tmp_path_factory.mktemp("failover")
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
                     ).save_pretrained(tmp / "hf")
    handles = launch_servers(2, str(tmp / "hf"), 0, ["--threads", "1", "--gen-delay-s", "0.4"], tmp / "logs",
                             command=TWIN_SERVER_COMMAND)
    try:
        for h in handles:
            h.wait_healthy(120, "/health")
        yield handles
    finally:
        for h in handles:
            h.terminate(timeout_s=10)


def _served(h: ServerHandle) -> int:
    return Path(h.log_path).read_text(errors="replace").count("served /generate")


def test_killed_server_mid_batch_loses_no_sample(servers: list[ServerHandle]) -> None:
    engine = SGLangEngine(SGLangConfig(chunk_size=1, concurrency_per_server=1, max_retries=1, backoff_s=0.05,
                                       request_timeout_s=60), handles=servers)
    victim, survivor = servers
    state = {"done": False, "killed_during_batch": None}

    def killer() -> None:
        deadline = time.monotonic() + 60
        while _served(victim) < 1 and time.monotonic() < deadline:  # it has completed a chunk of the batch
            time.sleep(0.02)
        state["killed_during_batch"] = not state["done"]
        victim.process.kill()  # SIGKILL to our own child, by its pid
        victim.process.wait(10)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        batch = engine.generate(PROMPTS, PARAMS)
        state["done"] = True
        thread.join(30)
        assert state["killed_during_batch"] is True
        assert victim.process.returncode == -9
        # the client reported the dead server, with its log tail
        assert list(engine.client.dead) == [victim.index]
        report = engine.client.dead[victim.index]
        assert victim.describe() in report and "log tail" in report and "served /generate" in report
        # every sample is there, in order, and equals what the survivor produces alone
        assert [len(group) for group in batch] == [1] * len(PROMPTS)
        alone = engine.generate(PROMPTS, PARAMS)
        assert [[c.token_ids for c in g] for g in batch] == [[c.token_ids for c in g] for g in alone]
        assert all(len(g[0].token_ids) == 4 and g[0].finish_reason == "length" for g in batch)
        assert _served(victim) >= 1 and _served(survivor) >= len(PROMPTS) // 2
    finally:
        engine.shutdown()
