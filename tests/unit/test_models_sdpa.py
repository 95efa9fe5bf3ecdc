"""The local spec's SDPA core attention equals megatron's DotProductAttention and HF (fp32, CPU):
causal (no mask), GQA, and an explicit block-diagonal mask (the packed-rows path)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import spark_mcore.config  # noqa: F401
from spark_mcore.distributed.config import ParallelConfig
from spark_mcore.distributed.parallel import destroy_distributed, init_distributed
from spark_mcore.models.config import ModelConfig
from spark_mcore.models.registry import get_adapter
from spark_mcore.models.sdpa import SDPACoreAttention

transformers = pytest.importorskip("transformers")
VOCAB = 97


@pytest.fixture(scope="module", autouse=True)
def world_of_one() -> Iterator[None]:
    init_distributed(ParallelConfig(tp=1, pp=1), seed=7)
    yield
    destroy_distributed()


def _pair(num_query_groups: int) -> tuple[torch.nn.Module, torch.nn.Module, ModelConfig]:
    cfg = ModelConfig(hidden_size=64, num_layers=2, ffn_hidden_size=96, num_attention_heads=4,
                      num_query_groups=num_query_groups, attention="sdpa")
    adapter = get_adapter("qwen2", cfg)
    sdpa = adapter.build_model(cfg, VOCAB).eval()
    ref_cfg = ModelConfig(**{**cfg.__dict__, "attention": "megatron"})
    ref = get_adapter("qwen2", ref_cfg).build_model(ref_cfg, VOCAB).eval()
    ref.load_state_dict(sdpa.state_dict())
    assert any(isinstance(m, SDPACoreAttention) for m in sdpa.modules())
    assert not any(isinstance(m, SDPACoreAttention) for m in ref.modules())
    return sdpa, ref, cfg


@pytest.mark.parametrize("groups", [1, 2])
def test_sdpa_equals_megatron_attention(groups: int) -> None:
    sdpa, ref, _ = _pair(groups)
    tokens = torch.randint(0, VOCAB, (3, 13), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(13).expand(3, 13)
    with torch.no_grad():
        a = sdpa(input_ids=tokens, position_ids=pos, attention_mask=None)
        b = ref(input_ids=tokens, position_ids=pos, attention_mask=None)
        # block-diagonal causal mask (True = masked): two sequences of 6 and 7 tokens per row
        seg = torch.tensor([0] * 6 + [1] * 7)
        allowed = (seg[:, None] == seg[None, :]) & torch.ones(13, 13, dtype=torch.bool).tril()
        mask = (~allowed).expand(3, 1, 13, 13)
        am = sdpa(input_ids=tokens, position_ids=pos, attention_mask=mask)
        bm = ref(input_ids=tokens, position_ids=pos, attention_mask=mask)
    assert (a - b).abs().max().item() <= 1e-5
    assert (am - bm).abs().max().item() <= 1e-5
    assert (am - a).abs().max().item() > 1e-3  # the mask mattered


def test_sdpa_matches_hf_logits() -> None:
    sdpa, _, cfg = _pair(2)
    adapter = get_adapter("qwen2", cfg)
    torch.manual_seed(1)
    hf = transformers.Qwen2ForCausalLM(adapter.hf_config(cfg, VOCAB)).eval()
    adapter.load_hf_state(sdpa, hf.state_dict())
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (adapter.forward(sdpa, tokens) - hf(tokens).logits).abs().max().item() <= 1e-5
