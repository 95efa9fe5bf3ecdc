"""Weight sync of a Qwen2.5-VL trainer (TP2, gloo, vision tower trainable) into the CPU twin of
SGLang started from an HF export: afterwards every served tensor, the vision tower's included,
has the sha256 of the trainer's merged weights (the twin loads hub names into transformers-5
modules)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

import spark_mcore.config  # noqa: F401  (before component configs)
from spark_mcore.data.images import PROCESSOR_CONFIG, VisionProcessing, processor_config
from spark_mcore.distributed.config import ParallelConfig
from spark_mcore.distributed.launch import spawn_workers
from spark_mcore.distributed.parallel import init_distributed
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vl_tiny import VOCAB, tiny_hf_model, tiny_vl_config  # noqa: E402

pytestmark = pytest.mark.slow  # ~40 s of CPU (3 processes)


def _trainer(rank: int, url: str, out_dir: str) -> None:
    from spark_mcore.weights.config import WeightSyncConfig
    from spark_mcore.weights.export import iter_hf_weights
    from spark_mcore.weights.megatron_sync import MegatronWeightSync

    cfg = tiny_vl_config()
    ps = init_distributed(ParallelConfig(tp=2, backend="gloo"), seed=9)  # a model the twin has not seen
    adapter = get_adapter("qwen2_5_vl", cfg)
    model = adapter.build_model(cfg, VOCAB)
    expected = {n: tensor_sha256(t) for n, t in iter_hf_weights(model, adapter, ps.tp_group, 2)}
    client = SGLangClient(attach_servers([url]), SGLangConfig(max_retries=0)) if ps.tp_rank == 0 else None
    sync = MegatronWeightSync(WeightSyncConfig(wire_dtype="fp32", backend="gloo", bucket_mb=0.05,
                                               gather_bucket_mb=0.05, timeout_s=120), adapter, ps, client)
    try:
        before = None
        if rank == 0:
            ServerHandle(url=url).wait_healthy(120, "/health")
            before = http_json(url, "/debug/weights")
        sync.connect()
        sync.sync(model, version=1)
        if rank == 0:
            digest = http_json(url, "/debug/weights")
            Path(out_dir, "result.json").write_text(json.dumps({"expected": expected, "digest": digest,
                                                                    "before": before}))
    finally:
        sync.close()
        if client is not None:
            client.close()


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("vl_twin")
    cfg = tiny_vl_config()
    tiny_hf_model(cfg, seed=0).save_pretrained(tmp / "hf")
    # the twin serves a VL model only with its image processor's settings (as spark-mcore exports)
    v = cfg.vision
    unit = (v.patch_size * v.spatial_merge_size) ** 2
    processing = VisionProcessing(v.patch_size, v.spatial_merge_size, v.temporal_patch_size, unit, 4 * unit)
    (tmp / "hf" / PROCESSOR_CONFIG).write_text(json.dumps(processor_config(processing)))
    servers = launch_servers(1, str(tmp / "hf"), 0, ["--threads", "1"], tmp / "logs", command=TWIN_SERVER_COMMAND)
    try:
        spawn_workers(_trainer, 2, args=(servers[0].url, str(tmp)), timeout_s=300)
        return json.loads((tmp / "result.json").read_text())
    finally:
        for s in servers:
            s.terminate(timeout_s=10)


def test_twin_weights_equal_the_trainers_incl_the_vision_tower(result: dict[str, Any]) -> None:
    served = {n: w["sha256"] for n, w in result["digest"]["weights"].items()}
    assert result["digest"]["weight_version"] == "1"
    assert served == result["expected"]
    assert sum(n.startswith("visual.") for n in served) > 10
    assert not tiny_vl_config().freeze_vision
    before = {n: w["sha256"] for n, w in result["before"]["weights"].items()}
    assert set(before) == set(served)
    changed = [n for n in served if before[n] != served[n]]
    assert {n for n in changed if n.startswith("visual.")} == {n for n in served if n.startswith("visual.")}
