"""Weight sync over real gloo groups: 2 trainer processes -> 1 test-server process.

The server starts from an HF checkpoint (seed 0). Phase tp2: the trainer (TP2) builds its own
random Megatron model (seed 7) and syncs it as policy version 1, fp32 on the wire. Phase pp2:
the same two processes re-form as PP2 (a sender per stage, one weight-update group each,
taking turns) and sync another random model as version 2. After each phase the server's
weights must equal the merged trainer weights BIT FOR BIT, its greedy generations must be
those of a local HF model holding the trainer weights, and every sample must carry the new
policy version.
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
from spark_mcore.sglang.client import (
    ServerHandle,
    SGLangClient,
    SGLangConfig,
    attach_servers,
    http_json,
    launch_servers,
)
from spark_mcore.twin.app import tensor_sha256
from spark_mcore.twin.server import TWIN_SERVER_COMMAND

pytestmark = pytest.mark.slow  # ~45 s on 2 shared cores (3 processes)

VOCAB = 64
PROMPTS = [[1, 2, 3, 4], [5, 6, 7], [9, 8, 7, 6, 5]]
GREEDY = {"max_new_tokens": 6, "temperature": 0.0}


def _cfg() -> ModelConfig:
    return ModelConfig(hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                       vocab_size=VOCAB, tie_word_embeddings=False)


def _generate(url: str) -> list[dict[str, Any]]:
    return http_json(url, "/generate", {"input_ids": PROMPTS, "sampling_params": GREEDY, "return_logprob": True})


PHASES = [("tp2", 2, 1, 1, 7), ("pp2", 1, 2, 2, 11)]  # (name, tp, pp, policy version, seed)


def _phase(rank: int, url: str, out: Path, name: str, tp: int, pp: int, version: int, seed: int) -> None:
    from spark_mcore.weights.config import WeightSyncConfig
    from spark_mcore.weights.megatron_sync import MegatronWeightSync

    ps = init_distributed(ParallelConfig(tp=tp, pp=pp, backend="gloo"), seed=seed)
    adapter = get_adapter("qwen2", _cfg())
    model = adapter.build_model(_cfg(), VOCAB, pre_process=ps.is_first_stage, post_process=ps.is_last_stage)
    state = {k: v.detach().clone() for k, v in mcore_tp.local_state(model).items()}
    torch.save({"offset": mcore_tp.layer_offset(model), "tp_rank": ps.tp_rank, "state": state},
               out / f"{name}_shard{rank}.pt")
    client = SGLangClient(attach_servers([url]), SGLangConfig(max_retries=0)) if ps.tp_rank == 0 else None
    cfg = WeightSyncConfig(wire_dtype="fp32", backend="gloo", bucket_mb=0.02, gather_bucket_mb=0.02, timeout_s=60)
    sync = MegatronWeightSync(cfg, adapter, ps, client)
    try:
        if rank == 0:
            ServerHandle(url=url).wait_healthy(120, "/health")  # the server boots while we import megatron
        before = _generate(url) if rank == 0 else None
        sync.connect()
        stats = sync.sync(model, version=version)
        if rank == 0:
            result = {"before": before, "after": _generate(url), "digest": http_json(url, "/debug/weights"),
                      "buckets": stats.buckets, "tensors": stats.tensors, "bytes": stats.bytes,
                      "version": sync.policy_version}
            (out / f"{name}_result.json").write_text(json.dumps(result))
    finally:
        sync.close()
        if client is not None:
            client.close()


def _trainer(rank: int, url: str, out_dir: str) -> None:
    """Phase tp2 (one sender), then phase pp2 (a sender per stage, two groups, taking turns).
    One torch world for both: init_distributed re-forms only megatron's groups (re-creating the
    default group on the same env:// port races with the old store)."""
    for phase in PHASES:
        _phase(rank, url, Path(out_dir), *phase)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from transformers import Qwen2ForCausalLM

    tmp = tmp_path_factory.mktemp("wsync")
    torch.manual_seed(0)
    Qwen2ForCausalLM(get_adapter("qwen2").hf_config(_cfg(), VOCAB)).save_pretrained(tmp / "hf")
    servers = launch_servers(1, str(tmp / "hf"), 0, ["--threads", "1"], tmp / "logs", command=TWIN_SERVER_COMMAND)
    try:
        spawn_workers(_trainer, 2, args=(servers[0].url, str(tmp)), timeout_s=240)
        yield {"dir": tmp, **{name: json.loads((tmp / f"{name}_result.json").read_text()) for name, *_ in PHASES}}
    finally:
        for s in servers:
            s.terminate(timeout_s=10)


def _expected_hf(tmp: Path, phase: str) -> dict[str, torch.Tensor]:
    """Merge the ranks' shards (TP) and stages (PP, global layer names) -> HF tensors."""
    adapter = get_adapter("qwen2", _cfg())
    by_name: dict[str, dict[int, torch.Tensor]] = {}
    for r in range(2):
        shard = torch.load(tmp / f"{phase}_shard{r}.pt")
        for name, t in shard["state"].items():
            by_name.setdefault(mcore_tp.shift_layer_index(name, shard["offset"]), {})[shard["tp_rank"]] = t
    out: dict[str, torch.Tensor] = {}
    for name, shards in by_name.items():
        full = adapter.merge_tp_shards(name, [shards[r] for r in sorted(shards)])
        out.update(adapter.mcore_to_hf(name, full))
    return out


@pytest.mark.parametrize("phase", [p[0] for p in PHASES])
def test_server_weights_equal_merged_trainer_weights_bitwise(run: dict[str, Any], phase: str) -> None:
    expected = _expected_hf(run["dir"], phase)
    res = run[phase]
    served = res["digest"]["weights"]
    assert set(served) == set(expected) and len(expected) == 2 * 12 + 3  # q/k/v w+b, o, gate/up/down, 2 norms
    for name, t in expected.items():
        assert served[name]["dtype"] == "float32" and served[name]["shape"] == list(t.shape), name
        assert served[name]["sha256"] == tensor_sha256(t), name
    if phase == "tp2":  # one sender sent everything; under pp2 rank 0 reports stage 0's share
        assert res["tensors"] == len(expected) and res["buckets"] >= 3  # 20 KiB buckets: several broadcasts
        assert res["bytes"] == sum(t.numel() * 4 for t in expected.values())
    else:
        stage0 = [n for n in expected if ".layers.1." not in n and n not in ("model.norm.weight", "lm_head.weight")]
        assert res["tensors"] == len(stage0)


@pytest.mark.parametrize("phase,old,new", [("tp2", "0", "1"), ("pp2", "1", "2")])
def test_generations_follow_the_new_weights_and_carry_the_version(run: dict[str, Any], phase: str, old: str,
                                                                  new: str) -> None:
    from transformers import Qwen2ForCausalLM

    res = run[phase]
    assert res["version"] == int(new) and res["digest"]["weight_version"] == new
    assert [s["meta_info"]["weight_version"] for s in res["before"]] == [old] * len(PROMPTS)
    assert [s["meta_info"]["weight_version"] for s in res["after"]] == [new] * len(PROMPTS)
    before = [s["output_ids"] for s in res["before"]]
    after = [s["output_ids"] for s in res["after"]]
    assert before != after
    torch.set_num_threads(1)
    model = Qwen2ForCausalLM(get_adapter("qwen2").hf_config(_cfg(), VOCAB)).eval()
    model.load_state_dict(_expected_hf(run["dir"], phase), strict=True)
    for prompt, got in zip(PROMPTS, after, strict=False):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert out[0, len(prompt):].tolist() == got
