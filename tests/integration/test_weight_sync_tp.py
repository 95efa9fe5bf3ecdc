"""Weight sync over a real gloo group: 2 trainer processes (TP2) -> 1 test-server process.

The server starts from an HF checkpoint (seed 0); the trainer builds its own random Megatron
model (seed 7), syncs it with fp32 on the wire, and the server's weights must then equal the
TP-merged trainer weights BIT FOR BIT, its greedy generations must be those of a local HF
model holding the trainer weights, and every sample must carry the new policy version.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import spark_mcore.config  # noqa: F401  (before component configs: config/__init__ imports them)
from spark_mcore.distributed.config import ParallelConfig
from spark_mcore.distributed.launch import spawn_workers
from spark_mcore.distributed.parallel import init_distributed
from spark_mcore.models import mcore_tp
from spark_mcore.models.config import ModelConfig
from spark_mcore.models.registry import get_adapter
from spark_mcore.rollout.sglang import SGLangClient, SGLangConfig, attach_servers, http_json, launch_servers
from spark_mcore.rollout.server_app import tensor_sha256
from spark_mcore.rollout.test_server import TEST_SERVER_COMMAND

pytestmark = pytest.mark.slow  # ~40 s on 2 shared cores (3 processes)

VOCAB = 64
PROMPTS = [[1, 2, 3, 4], [5, 6, 7], [9, 8, 7, 6, 5]]
GREEDY = {"max_new_tokens": 6, "temperature": 0.0}


def _cfg() -> ModelConfig:
    return ModelConfig(hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                       vocab_size=VOCAB, tie_word_embeddings=False)


def _generate(url: str) -> list[dict[str, Any]]:
    return http_json(url, "/generate", {"input_ids": PROMPTS, "sampling_params": GREEDY, "return_logprob": True})


def _trainer(rank: int, url: str, out_dir: str) -> None:
    from spark_mcore.weights.config import WeightSyncConfig
    from spark_mcore.weights.megatron_sync import MegatronWeightSync

    ps = init_distributed(ParallelConfig(tp=2, backend="gloo"), seed=7)
    adapter = get_adapter("qwen2", _cfg())
    model = adapter.build_model(_cfg(), VOCAB)
    torch.save({k: v.detach().clone() for k, v in mcore_tp.local_state(model).items()}, Path(out_dir) / f"shard{rank}.pt")
    client = SGLangClient(attach_servers([url]), SGLangConfig(max_retries=0)) if rank == 0 else None
    cfg = WeightSyncConfig(wire_dtype="fp32", backend="gloo", bucket_mb=0.02, gather_bucket_mb=0.02, timeout_s=60)
    sync = MegatronWeightSync(cfg, adapter, ps, client)
    try:
        before = _generate(url) if rank == 0 else None
        sync.connect()
        stats = sync.sync(model, version=1)
        if rank == 0:
            after = _generate(url)
            result = {"before": before, "after": after, "buckets": stats.buckets, "tensors": stats.tensors,
                      "bytes": stats.bytes, "version": sync.policy_version}
            (Path(out_dir) / "result.json").write_text(json.dumps(result))
    finally:
        sync.close()
        if client is not None:
            client.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from transformers import Qwen2ForCausalLM

    tmp = tmp_path_factory.mktemp("wsync")
    torch.manual_seed(0)
    Qwen2ForCausalLM(get_adapter("qwen2").hf_config(_cfg(), VOCAB)).save_pretrained(tmp / "hf")
    servers = launch_servers(1, str(tmp / "hf"), 0, ["--threads", "1"], tmp / "logs", command=TEST_SERVER_COMMAND)
    try:
        servers[0].wait_healthy(120, "/health")
        spawn_workers(_trainer, 2, args=(servers[0].url, str(tmp)), timeout_s=180)
        digest = http_json(servers[0].url, "/debug/weights")
        yield {"dir": tmp, "digest": digest, "result": json.loads((tmp / "result.json").read_text())}
    finally:
        for s in servers:
            s.terminate(timeout_s=10)


def _expected_hf(tmp: Path) -> dict[str, torch.Tensor]:
    shards = [torch.load(tmp / f"shard{r}.pt") for r in range(2)]
    adapter = get_adapter("qwen2", _cfg())
    out: dict[str, torch.Tensor] = {}
    for name in shards[0]:
        full = adapter.merge_tp_shards(name, [s[name] for s in shards])
        out.update(adapter.mcore_to_hf(name, full))
    return out


def test_server_weights_equal_merged_trainer_weights_bitwise(run: dict[str, Any]) -> None:
    expected = _expected_hf(run["dir"])
    served = run["digest"]["weights"]
    assert set(served) == set(expected) and len(expected) == 2 * 12 + 3  # q/k/v w+b, o, gate/up/down, 2 norms
    for name, t in expected.items():
        assert served[name]["dtype"] == "float32" and served[name]["shape"] == list(t.shape), name
        assert served[name]["sha256"] == tensor_sha256(t), name
    res = run["result"]
    assert res["tensors"] == len(expected) and res["buckets"] >= 3  # 20 KiB buckets: several broadcasts
    assert res["bytes"] == sum(t.numel() * 4 for t in expected.values())


def test_generations_follow_the_new_weights_and_carry_the_version(run: dict[str, Any]) -> None:
    from transformers import Qwen2ForCausalLM

    res = run["result"]
    assert res["version"] == 1
    assert [s["meta_info"]["weight_version"] for s in res["before"]] == ["0"] * len(PROMPTS)
    assert [s["meta_info"]["weight_version"] for s in res["after"]] == ["1"] * len(PROMPTS)
    before = [s["output_ids"] for s in res["before"]]
    after = [s["output_ids"] for s in res["after"]]
    assert before != after
    torch.set_num_threads(1)
    model = Qwen2ForCausalLM(get_adapter("qwen2").hf_config(_cfg(), VOCAB)).eval()
    model.load_state_dict(_expected_hf(run["dir"]), strict=True)
    for prompt, got in zip(PROMPTS, after):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert out[0, len(prompt):].tolist() == got
