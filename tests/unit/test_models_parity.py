"""HF Qwen2ForCausalLM <-> megatron GPTModel parity at world size 1 (fp32, CPU)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import spark_mcore.config  # noqa: F401  (before component configs: config/__init__ imports them)
from spark_mcore.distributed.config import ParallelConfig
from spark_mcore.distributed.parallel import destroy_distributed, init_distributed
from spark_mcore.models.config import ModelConfig
from spark_mcore.models.registry import get_adapter

transformers = pytest.importorskip("transformers")

VOCAB = 97


@pytest.fixture(scope="module", autouse=True)
def world_of_one() -> Iterator[None]:
    init_distributed(ParallelConfig(tp=1, pp=1), seed=7)
    yield
    destroy_distributed()


def _tiny_hf(cfg: ModelConfig, seed: int) -> torch.nn.Module:
    adapter = get_adapter("qwen2", cfg)
    torch.manual_seed(seed)
    hf = transformers.Qwen2ForCausalLM(adapter.hf_config(cfg, VOCAB)).eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0: make them matter
        for name, p in hf.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.2 * torch.randn_like(p))
    return hf


CASES = {
    "tied_gqa": dict(tie_word_embeddings=True, num_attention_heads=4, num_query_groups=2),
    "untied_gqa": dict(tie_word_embeddings=False, num_attention_heads=4, num_query_groups=2),
    "tied_mha": dict(tie_word_embeddings=True, num_attention_heads=4, num_query_groups=4),
    "untied_mqa": dict(tie_word_embeddings=False, num_attention_heads=4, num_query_groups=1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf(case: str) -> None:
    cfg = ModelConfig(hidden_size=64, num_layers=2, ffn_hidden_size=96, rope_theta=1e6,
                      rms_norm_eps=1e-6, **CASES[case])
    hf = _tiny_hf(cfg, seed=1)
    adapter = get_adapter("qwen2", cfg)
    model = adapter.build_model(cfg, VOCAB).eval()
    adapter.load_hf_state(model, hf.state_dict())
    tokens = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(tokens).logits
        out = adapter.forward(model, tokens)
    assert out.shape == (3, 11, VOCAB)
    assert (out - ref).abs().max().item() <= 1e-5
    # Logits must actually depend on the weights (not a trivially equal all-zero output).
    assert ref.abs().max().item() > 1e-2


@pytest.mark.parametrize("tied", [True, False])
def test_export_is_bitwise_hf(tied: bool) -> None:
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=48, tie_word_embeddings=tied)
    hf_state = _tiny_hf(cfg, seed=3).state_dict()
    adapter = get_adapter("qwen2", cfg)
    model = adapter.build_model(cfg, VOCAB)
    adapter.load_hf_state(model, hf_state)
    exported = dict(adapter.export_hf_state(model))
    expected = set(hf_state) - ({"lm_head.weight"} if tied else set())
    assert set(exported) == expected
    for name, t in exported.items():
        assert torch.equal(t, hf_state[name]), name
        assert t.is_contiguous() and not t.requires_grad


def test_export_is_a_copy() -> None:
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_attention_heads=2, num_query_groups=1,
                      ffn_hidden_size=48)
    adapter = get_adapter("qwen2", cfg)
    model = adapter.build_model(cfg, VOCAB)
    exported = dict(adapter.export_hf_state(model))
    before = exported["model.norm.weight"].clone()
    with torch.no_grad():
        model.decoder.final_layernorm.weight.add_(1.0)
    assert torch.equal(exported["model.norm.weight"], before)


def test_hf_config_round_trip() -> None:
    cfg = ModelConfig(hidden_size=64, num_layers=3, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=96, rope_theta=12345.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, max_position_embeddings=256)
    adapter = get_adapter("qwen2")
    hf_cfg = adapter.hf_config(cfg, VOCAB, eos_token_id=5, pad_token_id=0)
    assert hf_cfg.rope_parameters["rope_theta"] == 12345.0
    assert (hf_cfg.eos_token_id, hf_cfg.pad_token_id) == (5, 0)
    back = adapter.model_config_from_hf(hf_cfg)
    assert back.vocab_size == VOCAB
    back.vocab_size = 0
    assert back == cfg
