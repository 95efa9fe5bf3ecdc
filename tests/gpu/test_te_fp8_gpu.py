"""Transformer Engine spec, FP8 and the SDPA core on a GPU (skipped without CUDA; TE and FP8
cases also without Transformer Engine or a GPU of compute capability >= 8.9)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
megatron = pytest.importorskip("megatron.core")

import spark_mcore.config  # noqa: E402,F401
from spark_mcore.algo.config import AlgoConfig  # noqa: E402
from spark_mcore.config import accel  # noqa: E402
from spark_mcore.distributed.config import ParallelConfig  # noqa: E402
from spark_mcore.distributed.parallel import destroy_distributed, init_distributed  # noqa: E402
from spark_mcore.models.config import ModelConfig  # noqa: E402
from spark_mcore.trainer.actor import MegatronActor  # noqa: E402
from spark_mcore.trainer.config import TrainerConfig  # noqa: E402
from spark_mcore.types import TrainBatch  # noqa: E402

VOCAB = 128
needs_te = pytest.mark.skipif(not accel.te_available(), reason="Transformer Engine does not import")


@pytest.fixture
def pstate():
    state = init_distributed(ParallelConfig(), seed=3)
    yield state
    destroy_distributed()


def _model(impl: str, attention: str = "auto") -> ModelConfig:
    return ModelConfig(hidden_size=128, num_layers=2, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=256, dtype="bf16", transformer_impl=impl, attention=attention)


def _batch(rows: int = 4, seq: int = 64) -> TrainBatch:
    tokens = torch.randint(1, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(rows, seq)
    mask[:, :8] = 0
    return TrainBatch(tokens=tokens, loss_mask=mask, advantages=torch.linspace(-1, 1, rows))


def _steps(actor: MegatronActor, n: int = 3) -> list[float]:
    actor.setup_optimizer(1e-3, 10, 0)
    return [actor.sft_step(_batch())["sft_loss"] for _ in range(n)]


def test_sdpa_core_equals_megatron_attention_in_bf16(pstate) -> None:
    a = MegatronActor(_model("local", "sdpa"), TrainerConfig(micro_batch_size=2), AlgoConfig(kl_coef=0.0), pstate, VOCAB)
    b = MegatronActor(_model("local", "megatron"), TrainerConfig(micro_batch_size=2), AlgoConfig(kl_coef=0.0), pstate, VOCAB)
    b.unwrapped.load_state_dict(a.unwrapped.state_dict())
    batch = _batch()
    assert torch.allclose(a.compute_logprobs(batch), b.compute_logprobs(batch), atol=2e-2)


@needs_te
def test_te_spec_trains_and_matches_the_local_spec(pstate) -> None:
    te = MegatronActor(_model("transformer_engine"), TrainerConfig(micro_batch_size=2), AlgoConfig(kl_coef=0.0),
                       pstate, VOCAB)
    assert any("transformer_engine" in type(m).__module__ for m in te.unwrapped.modules())
    local = MegatronActor(_model("local"), TrainerConfig(micro_batch_size=2), AlgoConfig(kl_coef=0.0), pstate, VOCAB)
    # same weights through the HF names both specs map to
    local.adapter.load_hf_state(local.unwrapped, dict(te.export_hf()))
    batch = _batch()
    assert torch.allclose(te.compute_logprobs(batch), local.compute_logprobs(batch), atol=5e-2)
    losses = _steps(te)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


@needs_te
@pytest.mark.skipif(not accel.fp8_capable_gpu(), reason="FP8 needs compute capability >= 8.9")
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_hybrid_steps(pstate, recipe: str) -> None:
    trainer = TrainerConfig(micro_batch_size=2, fp8="hybrid", fp8_recipe=recipe)
    actor = MegatronActor(_model("transformer_engine"), trainer, AlgoConfig(kl_coef=0.0), pstate, VOCAB)
    assert actor.tf_config.fp8 == "hybrid" and actor.tf_config.fp8_recipe == recipe
    losses = _steps(actor)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
