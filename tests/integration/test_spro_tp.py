"""SPRO's per-token advantages through the Megatron actor at TP2 (2 gloo processes) equal world
size 1: token advantages, loss metrics and the TP-merged gradients of one step (fp32, 1e-5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from grpo_batch import add_logprobs, fixed_grpo_batch, gather_full

import spark_mcore.config  # noqa: F401  (loader before component configs)
from spark_mcore.algo.config import AlgoConfig
from spark_mcore.distributed.config import ParallelConfig
from spark_mcore.distributed.launch import spawn_workers
from spark_mcore.distributed.parallel import ParallelState, destroy_distributed, init_distributed
from spark_mcore.models import mcore_tp
from spark_mcore.models.config import ModelConfig
from spark_mcore.trainer.actor import MegatronActor
from spark_mcore.trainer.advantages import refine_advantages
from spark_mcore.trainer.config import TrainerConfig

pytestmark = pytest.mark.slow

VOCAB = 64
METRICS = ["pg_loss", "kl", "entropy", "grad_norm", "clip_frac"]


def _actor(pstate: ParallelState) -> MegatronActor:
    model = ModelConfig(hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=64, tie_word_embeddings=True)
    algo = AlgoConfig(kl_coef=0.0, clip_eps=0.2, advantage="spro", spro_beta=0.5)
    return MegatronActor(model, TrainerConfig(micro_batch_size=2, lr=1e-3, warmup_ratio=0.0), algo, pstate, VOCAB)


def _step(actor: MegatronActor) -> dict[str, object]:
    actor.setup_optimizer(lr=1e-3, total_steps=10, warmup_steps=0)
    actor.snapshot_reference()  # kept although kl_coef = 0: SPRO needs it
    # old = the actor's log-probs + a per-token offset, ref = the actor's: a non-zero process reward
    batch = add_logprobs(actor, fixed_grpo_batch())
    batch.group_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    refine_advantages(batch, actor.algo)
    metrics = actor.train_step(batch)
    return {"adv": batch.advantages, "metrics": metrics, "grads": gather_full(actor, "grad")}


def _worker(rank: int, init_path: str, out_dir: str) -> None:
    pstate = init_distributed(ParallelConfig(tp=2), seed=3)
    actor = _actor(pstate)
    mcore_tp.load_full_mcore_state(actor.unwrapped, torch.load(init_path), pstate.tp_rank, pstate.tp_size)
    torch.save(_step(actor), Path(out_dir) / f"rank{rank}.pt")


def test_spro_step_tp2_matches_world_size_one(tmp_path: Path) -> None:
    pstate = init_distributed(ParallelConfig(), seed=1)
    try:
        actor = _actor(pstate)
        init = {k: v.detach().clone() for k, v in mcore_tp.local_state(actor.unwrapped).items()}
        ref = _step(actor)
    finally:
        destroy_distributed()
    torch.save(init, tmp_path / "init.pt")
    spawn_workers(_worker, 2, args=(str(tmp_path / "init.pt"), str(tmp_path)), timeout_s=300)
    assert ref["adv"].shape == (8, 12) and abs(ref["metrics"]["pg_loss"]) > 1e-4
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(res["adv"], ref["adv"], atol=1e-5)
        for key in METRICS:
            assert res["metrics"][key] == pytest.approx(ref["metrics"][key], abs=1e-5), (rank, key)
        for gname, value in res["grads"].items():
            expected = ref["grads"].get(gname, ref["grads"]["embedding.word_embeddings.weight"])
            assert (value - expected).abs().max().item() <= 1e-5, (rank, gname)
