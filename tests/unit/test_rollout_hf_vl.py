"""The transformers rollout engine serving Qwen2.5-VL: weight sync from our megatron model
(hub names -> transformers-5 names) makes every engine tensor, vision tower included, equal to
the trainer's (sha256); greedy generation with images starts with our model's argmax."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import spark_mcore.config  # noqa: F401  (before component configs)
from spark_mcore.distributed.config import ParallelConfig
from spark_mcore.distributed.parallel import destroy_distributed, init_distributed
from spark_mcore.models.registry import get_adapter
from spark_mcore.models.vision import VisionInputs, canonical_hf_name
from spark_mcore.rollout.base import SamplingParams
from spark_mcore.rollout.hf_engine import HFEngine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vl_tiny import VOCAB, image_inputs, tiny_vl_config, vl_tokens  # noqa: E402


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def synced() -> Iterator[tuple]:
    init_distributed(ParallelConfig(), seed=11)
    cfg = tiny_vl_config()
    adapter = get_adapter("qwen2_5_vl", cfg)
    model = adapter.build_model(cfg, VOCAB).eval()
    with torch.no_grad():  # the trainer moved on: weights differ from any random init
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    engine = HFEngine(adapter.hf_config(cfg, VOCAB), decode=lambda ids: " ".join(map(str, ids)))
    engine.update_weights(adapter.export_hf_state(model), version=3)
    yield model, adapter, engine
    destroy_distributed()


def test_synced_engine_weights_equal_the_trainers(synced: tuple) -> None:
    model, adapter, engine = synced
    trainer = {name: _sha(t) for name, t in adapter.export_hf_state(model)}
    served = {canonical_hf_name(n): _sha(t) for n, t in engine.state_dict().items()
              if not n.endswith("inv_freq")}
    assert engine.policy_version == 3
    assert served == trainer
    assert sum(n.startswith("visual.") for n in served) > 10


def test_generate_with_images(synced: tuple) -> None:
    model, adapter, engine = synced
    grids = [(4, 8)]
    ids = vl_tokens([3, 4], grids, seed=2)
    pv, thw = image_inputs(grids, seed=3)
    images = VisionInputs(pv, thw)
    text = vl_tokens([6], [], seed=4)
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=3)
    out = engine.generate([ids[0].tolist(), text[0].tolist()], params, images=[images, None])
    assert [len(c) for c in out] == [2, 2]
    with torch.no_grad():
        first = adapter.forward(model, ids, images=images)[0, -1].argmax().item()
        first_text = adapter.forward(model, text)[0, -1].argmax().item()
    assert out[0][0].token_ids == out[0][1].token_ids and out[0][0].token_ids[0] == first
    assert out[1][0].token_ids[0] == first_text
    with pytest.raises(ValueError, match="images: 1 entries for 2 prompts"):
        engine.generate([ids[0].tolist(), text[0].tolist()], params, images=[images])
