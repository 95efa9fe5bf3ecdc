"""First-cluster-run faults against the CPU twin of SGLang (one launched twin process):

* fault 7: a trainer that restarts against long-lived servers forms its weight-update group
  again (the stale server-side group is destroyed first); close() drops it on the server;
* fault 10: gpus_per_server is checked against GET /get_server_info; /flush_cache carries
  a timeout; a sync with the NCCL-off default (gloo) still pipelines;
* fault 4: the launched server's environment has none of torchrun's variables.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import spark_mcore.config  # noqa: F401
from spark_mcore.config.loader import ConfigError
from spark_mcore.models.config import ModelConfig
from spark_mcore.models.registry import get_adapter
from spark_mcore.rollout.sglang_engine import SGLangEngine
from spark_mcore.sglang.client import SGLangClient, attach_servers, http_json, launch_servers
from spark_mcore.sglang.config import SGLangConfig
from spark_mcore.twin.server import TWIN_SERVER_COMMAND
from spark_mcore.weights.config import WeightSyncConfig
from spark_mcore.weights.server_calls import ServerCalls
from spark_mcore.weights.sync import BucketSender, begin_update, end_update

VOCAB = 64


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory, monkeypatch_module: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    from transformers import Qwen2ForCausalLM

    tmp = tmp_path_factory.mktemp("faults")
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                      vocab_size=VOCAB, tie_word_embeddings=False)
    torch.manual_seed(0)
    Qwen2ForCausalLM(get_adapter("qwen2").hf_config(cfg, VOCAB)).save_pretrained(tmp / "hf")
    # the launcher runs inside a "torchrun worker": these must not reach the server
    for k, v in {"RANK": "3", "WORLD_SIZE": "4", "MASTER_PORT": "1", "TORCHELASTIC_USE_AGENT_STORE": "True"}.items():
        monkeypatch_module.setenv(k, v)
    env_dump = tmp / "env.json"
    command = ["{python}", "-c", "import json, os, runpy, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w')); "
               "sys.argv = sys.argv[1:]; runpy.run_module('spark_mcore.twin', run_name='__main__')",
               str(env_dump), *TWIN_SERVER_COMMAND[3:]]
    (server,) = launch_servers(1, str(tmp / "hf"), 0, ["--threads", "1"], tmp / "logs", command=command, gpu_count=0)
    try:
        server.wait_healthy(120)
        yield server.url, env_dump
    finally:
        server.terminate(timeout_s=10)


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _weights() -> list[tuple[str, torch.Tensor]]:
    from transformers import Qwen2ForCausalLM

    cfg = ModelConfig(hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                      vocab_size=VOCAB, tie_word_embeddings=False)
    torch.manual_seed(5)
    model = Qwen2ForCausalLM(get_adapter("qwen2").hf_config(cfg, VOCAB))
    return [(n, p.detach().clone()) for n, p in model.named_parameters()]


def test_server_env_has_no_torchrun_variables(twin: tuple[str, Path]) -> None:
    env = json.loads(twin[1].read_text())
    assert not {"RANK", "WORLD_SIZE", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"} & set(env)


def test_group_is_recreated_after_a_trainer_restart(twin: tuple[str, Path]) -> None:
    url = twin[0]
    client = SGLangClient(attach_servers([url]), SGLangConfig(urls=[url], flush_timeout_s=5.0))
    cfg = WeightSyncConfig(backend="gloo", bucket_mb=0.05, wire_dtype="fp32", group_name="restart")
    first = BucketSender(cfg)
    first.connect(client)
    assert first.pipeline_requests  # gloo: pipelined by default; nccl resolves to off
    assert not cfg.resolved_pipeline_requests("nccl") and cfg.resolved_pipeline_requests("gloo")
    # the trainer dies: its side of the group is gone, the server still holds "restart"
    first.group.destroy()
    first.group = None
    second = BucketSender(cfg)
    second.connect(client)  # destroys the stale group on the server, then forms a new one
    calls = ServerCalls(client)
    try:
        begin_update(calls, cfg)  # pause -> flush (with timeout_s) -> begin
        stats = second.send(calls, _weights(), version=3)
        end_update(calls, cfg)
    finally:
        calls.close()
    assert stats.buckets > 1 and http_json(url, "/get_model_info")["weight_version"] == "3"
    second.close()  # leaves the group here and on the server
    assert client.destroy_weights_update_group("restart") == [url]  # nothing left to destroy
    client.close()


def test_gpus_per_server_is_checked_against_the_server(twin: tuple[str, Path]) -> None:
    url = twin[0]
    SGLangEngine(SGLangConfig(urls=[url])).shutdown()  # the twin is one rank: 1 matches
    with pytest.raises(ConfigError, match=r"sglang.gpus_per_server=2, but .* set sglang.gpus_per_server=1"):
        SGLangEngine(SGLangConfig(urls=[url], gpus_per_server=2))
