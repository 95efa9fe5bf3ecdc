"""Qwen2.5-VL: our M-RoPE positions vs transformers' get_rope_index, and HF
Qwen2_5_VLForConditionalGeneration vs our megatron model (fp32 CPU logits within 1e-5)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import spark_mcore.config  # noqa: F401  (before component configs)
from spark_mcore.distributed.config import ParallelConfig
from spark_mcore.distributed.parallel import destroy_distributed, init_distributed
from spark_mcore.models.mrope import mrope_position_ids
from spark_mcore.models.qwen2_5_vl import VisionInputs, canonical_hf_name  # re-exported
from spark_mcore.models.registry import get_adapter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vl_tiny import IMAGE, MERGE, VOCAB, image_inputs, tiny_hf_model, tiny_vl_config, vl_tokens  # noqa: E402

pytest.importorskip("transformers")

CASES = {  # name: (text run lengths, image grids (h, w) in patches)
    "one_image": ([3, 5], [(4, 4)]),
    "two_images_of_different_sizes": ([2, 3, 4], [(4, 8), (6, 4)]),
    "text_only": ([9], []),
}


@pytest.fixture(scope="module", autouse=True)
def world_of_one() -> Iterator[None]:
    init_distributed(ParallelConfig(tp=1, pp=1), seed=7)
    yield
    destroy_distributed()


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, torch.nn.Module, object]:
    cfg = tiny_vl_config()
    hf = tiny_hf_model(cfg, seed=1)
    adapter = get_adapter("qwen2_5_vl", cfg)
    model = adapter.build_model(cfg, VOCAB).eval()
    adapter.load_hf_state(model, hf.state_dict())
    return hf, model, adapter


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf(pair: tuple, case: str) -> None:
    hf, model, adapter = pair
    texts, grids = CASES[case]
    ids = vl_tokens(texts, grids, seed=3)
    with torch.no_grad():
        if grids:
            pv, thw = image_inputs(grids, seed=4)
            ref = hf(input_ids=ids, pixel_values=pv, image_grid_thw=thw,
                     mm_token_type_ids=(ids == IMAGE).int()).logits
            out = adapter.forward(model, ids, images=VisionInputs(pv, thw))
        else:
            ref = hf(input_ids=ids).logits
            out = adapter.forward(model, ids)
    assert out.shape == ref.shape == (1, ids.shape[1], VOCAB)
    assert (out - ref).abs().max().item() <= 1e-5
    assert ref.abs().max().item() > 1e-1


def test_images_change_the_logits(pair: tuple) -> None:
    """The image embeddings are really used: other pixels give other logits after the image."""
    _, model, adapter = pair
    ids = vl_tokens([3, 5], [(4, 4)], seed=3)
    pv, thw = image_inputs([(4, 4)], seed=4)
    with torch.no_grad():
        a = adapter.forward(model, ids, images=VisionInputs(pv, thw))
        b = adapter.forward(model, ids, images=VisionInputs(pv + 1.0, thw))
    assert torch.equal(a[:, :4], b[:, :4])  # before the image pads: causal, identical
    assert (a[:, -1] - b[:, -1]).abs().max().item() > 1e-3


def test_image_token_count_mismatch_is_an_error(pair: tuple) -> None:
    _, model, adapter = pair
    ids = vl_tokens([3, 5], [(4, 4)], seed=3)
    pv, thw = image_inputs([(4, 8)], seed=4)
    with pytest.raises(ValueError, match="image"):
        adapter.forward(model, ids, images=VisionInputs(pv, thw))
    with pytest.raises(ValueError, match="image tokens"):
        adapter.forward(model, ids)


def test_mrope_positions_match_get_rope_index_with_padding(pair: tuple) -> None:
    hf = pair[0]
    rows = [vl_tokens([2, 3], [(4, 8)], seed=5)[0], vl_tokens([4, 1, 2], [(6, 4), (4, 4)], seed=6)[0]]
    length = max(len(r) for r in rows) + 2
    ids = torch.zeros(2, length, dtype=torch.long)
    mask = torch.zeros(2, length, dtype=torch.long)
    for i, r in enumerate(rows):  # right padding, as the trainer's batches
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    _, thw = image_inputs([(4, 8), (6, 4), (4, 4)], seed=0)
    ref, ref_delta = hf.model.get_rope_index(ids, (ids == IMAGE).int(), thw, attention_mask=mask)
    pos, delta = mrope_position_ids(ids, thw, IMAGE, MERGE, attention_mask=mask)
    assert torch.equal(pos, ref)
    assert torch.equal(delta, ref_delta.flatten())


def test_mrope_rejects_grids_without_tokens() -> None:
    ids = vl_tokens([3], [], seed=1)
    with pytest.raises(ValueError, match="no image tokens"):
        mrope_position_ids(ids, torch.tensor([[1, 4, 4]]), IMAGE, MERGE)


def test_export_is_bitwise_hub_names_from_either_spelling(pair: tuple) -> None:
    hf, model, adapter = pair
    state = hf.state_dict()  # transformers-5 spelling in memory
    exported = dict(adapter.export_hf_state(model))
    assert set(exported) == {canonical_hf_name(k) for k in state}
    assert any(k.startswith("visual.") for k in exported)
    for name, t in state.items():
        assert torch.equal(exported[canonical_hf_name(name)], t), name
    # the hub spelling loads the same weights
    hub = {canonical_hf_name(k): v for k, v in state.items()}
    cfg = tiny_vl_config()
    other = adapter.build_model(cfg, VOCAB)
    adapter.load_hf_state(other, hub)
    for (n1, t1), (n2, t2) in zip(adapter.export_hf_state(other), exported.items(), strict=True):
        assert n1 == n2 and torch.equal(t1, t2)


def test_freeze_vision() -> None:
    cfg = tiny_vl_config(freeze_vision=True)
    model = get_adapter("qwen2_5_vl", cfg).build_model(cfg, VOCAB)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("vision_model.") for n in frozen)
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith("vision_model.")}


def test_hf_config_round_trip() -> None:
    cfg = tiny_vl_config(tied=True)
    adapter = get_adapter("qwen2_5_vl", cfg)
    back = adapter.model_config_from_hf(adapter.hf_config(cfg, VOCAB))
    assert back == cfg
