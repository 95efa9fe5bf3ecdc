"""Name/layout rules of the qwen2 adapter and the tensor-parallel helpers (no model built)."""

from __future__ import annotations

import pytest
import torch

from spark_mcore.config.loader import ConfigError
from spark_mcore.models import mcore_tp
from spark_mcore.models.config import ModelConfig
from spark_mcore.models.qwen2 import HeadLayout, Qwen2Adapter, fuse_qkv, split_qkv
from spark_mcore.models.registry import ModelAdapter, get_adapter, list_families, register_adapter

# Q=4 query heads, G=2 groups, D=1: megatron rows are [q0 q1 k0 v0 | q2 q3 k1 v1].
LAY = HeadLayout(num_heads=4, num_groups=2, head_dim=1, tied=True)


def test_split_qkv_hand_computed() -> None:
    fused = torch.arange(8.0).reshape(8, 1)
    q, k, v = split_qkv(fused, LAY)
    assert q.flatten().tolist() == [0.0, 1.0, 4.0, 5.0]
    assert k.flatten().tolist() == [2.0, 6.0]
    assert v.flatten().tolist() == [3.0, 7.0]
    assert torch.equal(fuse_qkv(q, k, v, LAY), fused)
    bias_q, bias_k, bias_v = split_qkv(torch.arange(8.0), LAY)
    assert bias_k.tolist() == [2.0, 6.0]


def test_split_qkv_rejects_wrong_rows() -> None:
    with pytest.raises(ValueError, match="expected 8"):
        split_qkv(torch.zeros(7, 1), LAY)


def test_mcore_to_hf_names() -> None:
    cfg = ModelConfig(hidden_size=4, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=2)
    ad = get_adapter("qwen2", cfg)
    fc1 = torch.arange(4.0).reshape(4, 1)  # [gate0 gate1 up0 up1]
    pairs = ad.mcore_to_hf("decoder.layers.3.mlp.linear_fc1.weight", fc1)
    assert [n for n, _ in pairs] == ["model.layers.3.mlp.gate_proj.weight",
                                     "model.layers.3.mlp.up_proj.weight"]
    assert pairs[0][1].flatten().tolist() == [0.0, 1.0] and pairs[1][1].flatten().tolist() == [2.0, 3.0]
    qkv = ad.mcore_to_hf("decoder.layers.0.self_attention.linear_qkv.bias", torch.zeros(8))
    assert [n for n, _ in qkv] == [f"model.layers.0.self_attn.{p}_proj.bias" for p in "qkv"]
    norm = torch.ones(4)
    assert ad.mcore_to_hf("decoder.layers.1.self_attention.linear_qkv.layer_norm_weight", norm)[0][0] \
        == "model.layers.1.input_layernorm.weight"
    assert ad.mcore_to_hf("decoder.layers.1.pre_mlp_layernorm.weight", norm)[0][0] \
        == "model.layers.1.post_attention_layernorm.weight"
    assert ad.mcore_to_hf("output_layer.weight", torch.zeros(2, 4)) == []  # tied
    assert ad.mcore_to_hf("decoder.layers.0.mlp.linear_fc1._extra_state", torch.zeros(1)) == []
    with pytest.raises(KeyError, match="no Qwen2 HF name"):
        ad.mcore_to_hf("decoder.layers.0.mlp.router.weight", torch.zeros(1))


def test_hf_to_mcore_rejects_missing_and_unknown() -> None:
    cfg = ModelConfig(hidden_size=4, num_layers=1, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=2, tie_word_embeddings=True)
    ad = get_adapter("qwen2", cfg)
    with pytest.raises(KeyError, match="model.embed_tokens.weight"):
        ad.hf_to_mcore({})
    with pytest.raises(RuntimeError, match="bind"):
        get_adapter("qwen2").hf_to_mcore({})


def test_shard_and_merge_hand_computed() -> None:
    fc1 = torch.arange(8.0).reshape(8, 1)  # gate rows 0-3, up rows 4-7
    s1 = mcore_tp.shard_for_tp("decoder.layers.0.mlp.linear_fc1.weight", fc1, 1, 2)
    assert s1.flatten().tolist() == [2.0, 3.0, 6.0, 7.0]
    proj = torch.arange(8.0).reshape(2, 4)
    s0 = mcore_tp.shard_for_tp("decoder.layers.0.self_attention.linear_proj.weight", proj, 0, 2)
    assert s0.tolist() == [[0.0, 1.0], [4.0, 5.0]]
    emb = torch.arange(6.0).reshape(6, 1)
    assert mcore_tp.shard_for_tp("embedding.word_embeddings.weight", emb, 2, 3).flatten().tolist() \
        == [4.0, 5.0]
    norm = torch.arange(3.0)
    assert torch.equal(mcore_tp.shard_for_tp("decoder.final_layernorm.weight", norm, 1, 2), norm)
    for name, full in (("decoder.layers.0.mlp.linear_fc1.weight", fc1),
                       ("decoder.layers.0.self_attention.linear_proj.weight", proj),
                       ("decoder.layers.0.self_attention.linear_qkv.bias", torch.arange(8.0))):
        shards = [mcore_tp.shard_for_tp(name, full, r, 2) for r in range(2)]
        assert torch.equal(mcore_tp.merge_tp_shards(name, shards), full)


def test_shard_errors() -> None:
    with pytest.raises(ValueError, match="not divisible by tp=2"):
        mcore_tp.shard_for_tp("output_layer.weight", torch.zeros(5, 2), 0, 2)
    with pytest.raises(KeyError, match="no tensor-parallel rule"):
        mcore_tp.shard_for_tp("decoder.layers.0.mystery.weight", torch.zeros(2), 0, 2)
    with pytest.raises(ValueError, match="tp_rank=2"):
        mcore_tp.shard_for_tp("output_layer.weight", torch.zeros(4, 2), 2, 2)


def test_layer_index_shift() -> None:
    name = "decoder.layers.1.mlp.linear_fc2.weight"
    assert mcore_tp.layer_index(name) == 1
    assert mcore_tp.shift_layer_index(name, 4) == "decoder.layers.5.mlp.linear_fc2.weight"
    assert mcore_tp.layer_index("decoder.final_layernorm.weight") is None


def test_registry_contract() -> None:
    assert "qwen2" in list_families()
    adapter = get_adapter("qwen2")
    assert isinstance(adapter, ModelAdapter)
    assert isinstance(adapter, Qwen2Adapter) and adapter.family == "qwen2"
    with pytest.raises(ConfigError, match="known families: .*qwen2"):
        get_adapter("llama9")
    with pytest.raises(ValueError, match="already registered"):
        register_adapter("qwen2")(type("Other", (), {}))


def test_transformer_config_validation() -> None:
    cfg = ModelConfig(hidden_size=64, num_layers=3, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=96)
    ad = get_adapter("qwen2")
    with pytest.raises(ConfigError, match="model.num_layers=3 must be divisible by parallel.pp=2"):
        ad.transformer_config(cfg, 100, tp=1, pp=2)
    with pytest.raises(ConfigError, match="vocab_size=99 must be divisible by parallel.tp=2"):
        ad.transformer_config(cfg, 99, tp=2)
    tc = ad.transformer_config(cfg, 100)
    assert (tc.num_query_groups, tc.kv_channels, tc.normalization) == (2, 16, "RMSNorm")
    assert tc.gated_linear_unit and tc.add_qkv_bias and not tc.add_bias_linear
    assert tc.params_dtype == torch.float32 and tc.hidden_dropout == 0.0
