"""HF export under TP x PP (spark_mcore.weights.export) on stand-in modules, no process group.

Each (pp stage, tp rank) is a module tree holding exactly the Megatron shards that rank would
own (layer names local to the stage, `layer_number` global as in megatron). The TP all-gather
is simulated with one thread per TP rank meeting at a barrier, so the exporter runs its real
code path (flatten, one gather per group, cut, merge); the result must equal the original HF
weights bit for bit.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from torch import nn

import spark_mcore.config  # noqa: F401  (import order: config before models.config)
from spark_mcore.models import mcore_tp
from spark_mcore.models.config import ModelConfig
from spark_mcore.models.registry import get_adapter
from spark_mcore.weights import export


def _cfg(tied: bool) -> ModelConfig:
    return ModelConfig(hidden_size=32, num_layers=4, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                       vocab_size=64, tie_word_embeddings=tied)


def _hf_state(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(get_adapter("qwen2").hf_config(cfg, cfg.vocab_size))
    with torch.no_grad():
        for p in model.parameters():  # norms start at exactly 1 and biases at 0: make every tensor distinct
            p.add_(torch.randn_like(p) * 0.1)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _stage_module(full: dict[str, torch.Tensor], stage: int, pp: int, tp_rank: int, tp: int, tied: bool) -> nn.Module:
    layers_per = 4 // pp
    first, last = stage * layers_per, (stage + 1) * layers_per
    root = nn.Module()
    root.decoder = nn.Module()
    root.decoder.layers = nn.ModuleList()
    for i in range(first, last):
        layer = nn.Module()
        layer.layer_number = i + 1  # megatron numbers layers globally from 1
        root.decoder.layers.append(layer)
    names = [n for n in full if (i := mcore_tp.layer_index(n)) is not None and first <= i < last]
    if stage == 0:
        names.append("embedding.word_embeddings.weight")
    if stage == pp - 1:
        names.append("decoder.final_layernorm.weight")
        names.append("output_layer.weight")
    for name in names:
        src = full["embedding.word_embeddings.weight"] if name == "output_layer.weight" and tied else full[name]
        shard = mcore_tp.shard_for_tp(name, src, tp_rank, tp)
        local = mcore_tp.shift_layer_index(name, -first)
        *path, leaf = local.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, nn.Parameter(shard))
    return root


class _ThreadGather:
    """all_gather over threads: rank r deposits its flat, everyone reads all after a barrier."""

    def __init__(self, tp: int) -> None:
        self.tp, self.slots, self.barrier = tp, [None] * tp, threading.Barrier(tp)
        self.calls = 0

    def __call__(self, flat: torch.Tensor, tp_size: int, group: Any) -> torch.Tensor:
        rank = group  # the test passes the rank as the "group"
        self.slots[rank] = flat.clone()
        self.barrier.wait()
        out = torch.stack(self.slots)
        self.calls += rank == 0
        self.barrier.wait()
        return out


def _export(monkeypatch: pytest.MonkeyPatch, cfg: ModelConfig, tp: int, pp: int, wire: torch.dtype | None,
            gather_bytes: int) -> tuple[list[list[tuple[str, torch.Tensor]]], int]:
    adapter = get_adapter("qwen2", cfg)
    full = adapter.hf_to_mcore(_hf_state(cfg))
    gather = _ThreadGather(tp)
    monkeypatch.setattr(export, "_all_gather_flat", gather)
    per_stage = []
    for stage in range(pp):
        results: list[list] = [[] for _ in range(tp)]

        def run(r: int, stage: int = stage, results: list[list] = results) -> None:
            model = _stage_module(full, stage, pp, r, tp, cfg.tie_word_embeddings)
            results[r] = list(export.iter_hf_weights(model, adapter, tp_group=r, tp_size=tp, emit=r == 0,
                                                     wire_dtype=wire, gather_bucket_bytes=gather_bytes))
        threads = [threading.Thread(target=run, args=(r,)) for r in range(tp)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(results[r] == [] for r in range(1, tp)), "only the emitting rank yields tensors"
        per_stage.append(results[0])
    return per_stage, gather.calls


@pytest.mark.parametrize("tp,pp,tied", [(2, 2, False), (2, 1, True), (1, 2, True), (4, 1, False)])
def test_export_equals_hf_weights_bitwise(monkeypatch: pytest.MonkeyPatch, tp: int, pp: int, tied: bool) -> None:
    cfg = _cfg(tied)
    per_stage, _ = _export(monkeypatch, cfg, tp, pp, None, 1 << 30)
    hf = _hf_state(cfg)
    got = [n for stage in per_stage for n, _ in stage]
    want = set(hf) - ({"lm_head.weight"} if tied else set())
    assert len(got) == len(set(got)) and set(got) == want
    for stage in per_stage:
        for name, t in stage:
            assert t.dtype == torch.float32 and torch.equal(t, hf[name]), name
    if pp == 2:  # stage 1 exports layers 2..3 under their global names, stage 0 the embedding
        assert {n for n, _ in per_stage[1] if ".layers." in n} == {n for n in want if ".layers.2." in n or
                                                                   ".layers.3." in n}
        assert "model.embed_tokens.weight" in dict(per_stage[0])


def test_export_casts_before_gather_and_buckets_the_gathers(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(False)
    # embedding alone is 64*32*2 bytes per rank in bf16 -> x2 gathered = 8 KiB; a 16 KiB limit
    # gives several gathers, far fewer than the 4*7+2 sharded tensors.
    per_stage, calls = _export(monkeypatch, cfg, 2, 1, torch.bfloat16, 16 * 1024)
    hf = _hf_state(cfg)
    assert 2 <= calls < 10
    for name, t in per_stage[0]:
        assert t.dtype == torch.bfloat16
        assert torch.equal(t.view(torch.int16), hf[name].to(torch.bfloat16).view(torch.int16)), name


def test_tp_requires_group() -> None:
    with pytest.raises(ValueError, match="tp_group"):
        list(export.iter_full_mcore(nn.Linear(2, 2), tp_group=None, tp_size=2))
