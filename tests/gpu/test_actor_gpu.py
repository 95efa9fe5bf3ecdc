"""The Megatron actor on one GPU (skipped without CUDA or megatron-core): micro-batches built on
the CPU reach the model's device, log-probs come back on the CPU and equal transformers' on the
exported weights, and a GRPO step (padded and packed) runs with finite metrics."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
megatron = pytest.importorskip("megatron.core")

import spark_mcore.config  # noqa: E402,F401  (loader before component configs)
from spark_mcore.algo.config import AlgoConfig  # noqa: E402
from spark_mcore.distributed.config import ParallelConfig  # noqa: E402
from spark_mcore.distributed.parallel import destroy_distributed, init_distributed  # noqa: E402
from spark_mcore.models.config import ModelConfig  # noqa: E402
from spark_mcore.trainer.actor import MegatronActor  # noqa: E402
from spark_mcore.trainer.config import TrainerConfig  # noqa: E402
from spark_mcore.types import TrainBatch  # noqa: E402

VOCAB = 64


def _batch() -> TrainBatch:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, VOCAB, (6, 16), generator=g)
    mask = torch.zeros(6, 16)
    for i in range(6):
        mask[i, 4:16 - i] = 1
        tokens[i, 16 - i:] = 0
    return TrainBatch(tokens=tokens, loss_mask=mask, advantages=torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0]))


@pytest.mark.parametrize("pack", [False, True])
def test_actor_step_on_cuda(pack: bool) -> None:
    from transformers import AutoModelForCausalLM

    pstate = init_distributed(ParallelConfig(), seed=5)
    try:
        assert pstate.device.type == "cuda"
        model = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=128)
        trainer = TrainerConfig(micro_batch_size=2, lr=1e-3, warmup_ratio=0.0, pack_sequences=pack,
                                max_tokens_per_micro_batch=32 if pack else 0)
        actor = MegatronActor(model, trainer, AlgoConfig(kl_coef=0.1), pstate, VOCAB)
        actor.setup_optimizer(1e-3, 4, 0)
        actor.snapshot_reference()
        batch = _batch()
        batch.old_logprobs = actor.compute_logprobs(batch)
        batch.ref_logprobs = actor.compute_logprobs(batch, reference=True)
        assert batch.old_logprobs.device.type == "cpu"
        hf = AutoModelForCausalLM.from_config(actor.adapter.hf_config(model, VOCAB), dtype=torch.float32).eval()
        hf.load_state_dict({k: v.float().cpu() for k, v in actor.export_hf()}, strict=False)
        with torch.no_grad():
            ref = torch.log_softmax(hf(batch.tokens).logits.float(), -1)[:, :-1].gather(
                -1, batch.tokens[:, 1:, None])[..., 0]
        expect = torch.nn.functional.pad(ref, (1, 0)) * batch.loss_mask
        assert torch.allclose(batch.old_logprobs, expect, atol=1e-4)
        metrics = actor.train_step(batch)
        assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()) and metrics["grad_norm"] > 0
    finally:
        destroy_distributed()
