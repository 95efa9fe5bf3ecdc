"""HF -> Megatron at TP2 x PP2 (4 gloo processes, one spawn for both models) -> HF is bitwise,
and the TP2xPP2 checkpoint loaded at TP1 (as the trainer loads) matches transformers' logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import spark_mcore.config  # noqa: F401  (before component configs)
from spark_mcore.checkpoint.convert import (
    convert_mcore_to_hf,
    finish_hf_to_mcore,
    plan_hf_to_mcore,
    run_hf_to_mcore_jobs,
)
from spark_mcore.checkpoint.hf_io import SafetensorsReader
from spark_mcore.models.config import ModelConfig

VOCAB = 64


def _make_hf_model(path: Path, tied: bool, seed: int) -> dict[str, torch.Tensor]:
    """Tiny random Qwen2 (GQA 4 heads / 2 groups, QKV bias, 4 layers), fp32, saved to `path`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied, rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(path)
    return load_file(path / "model.safetensors")


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, tuple[Path, Path, dict]]:
    root = tmp_path_factory.mktemp("convert_tp2pp2")
    states = {tied: _make_hf_model(root / f"hf_{tied}", tied, seed=10 + int(tied)) for tied in (True, False)}
    jobs = {tied: plan_hf_to_mcore(root / f"hf_{tied}", root / f"run_{tied}", tp=2, pp=2, progress=False)
            for tied in (True, False)}
    run_hf_to_mcore_jobs(list(jobs.values()), timeout_s=240)
    return {tied: (root / f"hf_{tied}", finish_hf_to_mcore(job), states[tied]) for tied, job in jobs.items()}


@pytest.mark.parametrize("tied", [True, False])
def test_tp2pp2_roundtrip_is_bitwise(converted: dict, tmp_path: Path, tied: bool) -> None:
    _, step_dir, original = converted[tied]
    meta = json.loads((step_dir / "meta.json").read_text())
    assert (meta["tp"], meta["pp"], meta["model"]["tie_word_embeddings"]) == (2, 2, tied)
    # every one of the 4 ranks wrote its own part of the checkpoint
    assert len(list((step_dir / "model").glob("__*_0.distcp"))) == 4
    out = convert_mcore_to_hf(step_dir, tmp_path / "hf", progress=False)
    with SafetensorsReader(out) as r:
        back = {n: r.get(n) for n in r.names()}
    assert sorted(back) == sorted(original)
    for name, t in original.items():
        assert torch.equal(back[name], t), name


@pytest.mark.parametrize("tied", [True, False])
def test_tp2pp2_checkpoint_loads_at_tp1_with_transformers_logits(converted: dict, tied: bool) -> None:
    from megatron.core import dist_checkpointing
    from transformers import Qwen2ForCausalLM

    from spark_mcore.distributed.config import ParallelConfig
    from spark_mcore.distributed.parallel import destroy_distributed, init_distributed
    from spark_mcore.models.registry import get_adapter

    hf_dir, step_dir, _ = converted[tied]
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = Qwen2ForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()(input_ids=tokens).logits
    cfg = ModelConfig(**json.loads((step_dir / "meta.json").read_text())["model"])
    init_distributed(ParallelConfig(backend="gloo"), seed=7)
    try:
        adapter = get_adapter("qwen2", cfg)
        model = adapter.build_model(cfg, VOCAB)
        state = dist_checkpointing.load(model.sharded_state_dict(prefix=""), str(step_dir / "model"))
        model.load_state_dict(state)  # strict, as the trainer's load_actor_state
        with torch.no_grad():
            got = adapter.forward(model.eval(), tokens)
    finally:
        destroy_distributed()
    assert got.shape == ref.shape == (2, 9, VOCAB)
    assert (got - ref).abs().max().item() < 1e-5
