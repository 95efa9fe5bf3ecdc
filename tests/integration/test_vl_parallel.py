"""Qwen2.5-VL at TP2 and PP2 on gloo (one spawn of 2 processes), against transformers:

- conversion HF (transformers-5 names) -> Megatron at TP2 -> HF (hub names) is bitwise for
  every tensor, vision tower included; TP1 (in this process, hub names) too;
- logits of the TP2 model and of the PP2 pipeline (stage 0: tower + first layer, sent to
  stage 1) are within 1e-5 of transformers' for one image, two images of different sizes and
  text only; the replicated vision tower is identical on both TP ranks;
- weight sync's export (weights.export.iter_hf_weights) sends every tensor, the trainable
  vision tower included, with the HF checkpoint's bytes (sha256) at TP2 and from both PP2 stages.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

import spark_mcore.config  # noqa: F401  (before component configs)
from spark_mcore.checkpoint.convert import (
    convert_hf_to_mcore,
    convert_mcore_to_hf,
    finish_hf_to_mcore,
    plan_hf_to_mcore,
    run_hf_to_mcore_rank,
)
from spark_mcore.distributed.config import ParallelConfig
from spark_mcore.distributed.launch import spawn_workers
from spark_mcore.distributed.parallel import init_distributed
from spark_mcore.models import mcore_tp
from spark_mcore.models.qwen2_5_vl import VisionInputs, canonical_hf_name  # re-exported
from spark_mcore.models.registry import get_adapter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vl_tiny import IMAGE, VOCAB, image_inputs, tiny_hf_model, tiny_vl_config, vl_tokens  # noqa: E402

pytestmark = pytest.mark.slow  # ~50 s of CPU (2 spawned processes + conversions)

CASES = {"one_image": ([3, 5], [(4, 4)]), "two_images": ([2, 3, 4], [(4, 8), (6, 4)]),
         "text_only": ([9], [])}


def _inputs(case: str) -> tuple[torch.Tensor, VisionInputs | None]:
    texts, grids = CASES[case]
    ids = vl_tokens(texts, grids, seed=3)
    if not grids:
        return ids, None
    pv, thw = image_inputs(grids, seed=4)
    return ids, VisionInputs(pv, thw)


def _tp2(hf_state: dict, out: dict) -> None:
    cfg = tiny_vl_config()
    adapter = get_adapter("qwen2_5_vl", cfg)
    init_distributed(ParallelConfig(tp=2), seed=5)
    model = adapter.build_model(cfg, VOCAB, parallel_output=False).eval()
    adapter.load_hf_state(model, hf_state)
    with torch.no_grad():
        for case in CASES:
            ids, images = _inputs(case)
            out[f"tp2_{case}"] = adapter.forward(model, ids, images=images)
    out["tp2_sync"] = _synced(model, adapter, 2)
    tower = torch.cat([p.flatten() for p in model.vision_model.parameters()])
    gathered = [torch.empty_like(tower) for _ in range(2)]
    dist.all_gather(gathered, tower)
    out["tower_equal"] = torch.equal(gathered[0], gathered[1])


def _synced(model: torch.nn.Module, adapter: object, tp: int) -> dict[str, str]:
    """What weight sync sends from this rank: HF name -> sha256 of the tensor's bytes."""
    from megatron.core import parallel_state as ps

    from spark_mcore.weights.export import iter_hf_weights

    return {name: _sha(t) for name, t in iter_hf_weights(
        model, adapter, tp_group=ps.get_tensor_model_parallel_group(), tp_size=tp)}


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


def _pp2(rank: int, hf_state: dict, out: dict) -> None:
    from spark_mcore.models.qwen2_5_vl import position_ids_for

    cfg = tiny_vl_config()
    adapter = get_adapter("qwen2_5_vl", cfg)
    init_distributed(ParallelConfig(pp=2), seed=5)
    model = adapter.build_model(cfg, VOCAB, pre_process=rank == 0, post_process=rank == 1).eval()
    adapter.load_hf_state(model, hf_state)
    out["stage1_has_tower"] = rank == 1 and model.vision_model is not None
    out["pp2_sync"] = _synced(model, adapter, 1)
    with torch.no_grad():
        for case in CASES:
            ids, images = _inputs(case)
            pos = position_ids_for(model, ids, images)  # every stage rotates by them
            if rank == 0:
                hidden = model(input_ids=ids, position_ids=pos, attention_mask=None, images=images)
                dist.send(hidden.contiguous(), dst=1)
            else:
                hidden = torch.empty(ids.shape[1], 1, cfg.hidden_size)
                dist.recv(hidden, src=0)
                model.set_input_tensor(hidden)
                out[f"pp2_{case}"] = model(input_ids=ids, position_ids=pos, attention_mask=None)


def _worker(rank: int, job: object, hf_path: str, out_dir: str) -> None:
    run_hf_to_mcore_rank(job)  # type: ignore[arg-type]
    hf_state = load_file(hf_path)
    out: dict = {}
    _tp2(hf_state, out)
    _pp2(rank, hf_state, out)
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("vl_parallel")
    cfg = tiny_vl_config()
    hf = tiny_hf_model(cfg, seed=1)
    hf.save_pretrained(root / "hf_hub")  # transformers 5 saves the hub's names
    v5 = root / "hf_v5"  # the same model under transformers-5 in-memory names
    v5.mkdir()
    for f in (root / "hf_hub").iterdir():
        if f.suffix != ".safetensors":
            (v5 / f.name).write_bytes(f.read_bytes())
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    save_file(state, str(v5 / "model.safetensors"), metadata={"format": "pt"})
    reference = {}
    with torch.no_grad():
        for case in CASES:
            ids, images = _inputs(case)
            kw = {} if images is None else dict(pixel_values=images.pixel_values,
                                                image_grid_thw=images.image_grid_thw,
                                                mm_token_type_ids=(ids == IMAGE).int())
            reference[case] = hf(input_ids=ids, **kw).logits
    tp1 = convert_hf_to_mcore(root / "hf_hub", root / "run_tp1", progress=False)
    job = plan_hf_to_mcore(v5, root / "run_tp2", tp=2, progress=False)
    spawn_workers(_worker, 2, args=(job, str(v5 / "model.safetensors"), str(root)), timeout_s=300)
    tp2 = finish_hf_to_mcore(job)
    return {"root": root, "state": state, "reference": reference, "tp1": tp1, "tp2": tp2,
            "ranks": [torch.load(root / f"rank{r}.pt") for r in range(2)]}


@pytest.mark.parametrize("which", ["tp1", "tp2"])
def test_conversion_round_trip_is_bitwise(runs: dict, which: str) -> None:
    back = convert_mcore_to_hf(runs[which], runs["root"] / f"back_{which}", progress=False)
    got = load_file(back / "model.safetensors")
    expected = {canonical_hf_name(k): v for k, v in runs["state"].items()}
    assert sorted(got) == sorted(expected)
    assert sum(k.startswith("visual.") for k in got) > 10
    for name, t in expected.items():
        assert torch.equal(got[name], t), name
    assert '"Qwen2_5_VLForConditionalGeneration"' in (back / "config.json").read_text()


@pytest.mark.parametrize("case", sorted(CASES))
def test_tp2_and_pp2_logits_match_transformers(runs: dict, case: str) -> None:
    ref = runs["reference"][case]
    for rank in range(2):
        assert (runs["ranks"][rank][f"tp2_{case}"] - ref).abs().max().item() <= 1e-5
    assert (runs["ranks"][1][f"pp2_{case}"] - ref).abs().max().item() <= 1e-5


def test_tower_is_replicated_and_only_on_the_first_stage(runs: dict) -> None:
    assert runs["ranks"][0]["tower_equal"] and runs["ranks"][1]["tower_equal"]
    assert not runs["ranks"][1]["stage1_has_tower"]
    assert mcore_tp.tp_kind("vision_model.blocks.0.attn.qkv.weight") == "replicated"


def test_weight_sync_sends_the_vision_tower(runs: dict) -> None:
    expected = {canonical_hf_name(k): _sha(v) for k, v in runs["state"].items()}
    assert not tiny_vl_config().freeze_vision  # the tower trains, so it must be synced
    for rank in range(2):
        assert runs["ranks"][rank]["tp2_sync"] == expected
    stage0, stage1 = runs["ranks"][0]["pp2_sync"], runs["ranks"][1]["pp2_sync"]
    assert {k for k in stage0 if k.startswith("visual.")} == {k for k in expected if k.startswith("visual.")}
    assert not any(k.startswith("visual.") for k in stage1)
    assert {**stage0, **stage1} == expected
