"""The Megatron actor's GRPO step under TP2 (+DP2), PP2 (+DP2), TP2xPP2, DP4 and context
parallelism (CP2xDP2, TP2xCP2, PP2xCP2) on 4 gloo processes equals world size 1: old log-probs,
loss metrics, gradients and the weights after one optimizer step (fp32, within 1e-5).

The batch is 10 tokens wide, not a multiple of 2 x CP, so the CP layouts also pad. Under CP each
rank holds megatron's load-balanced split of every sequence; the local spec's SDPA core (the
attention of every layout here) all-gathers keys and values; megatron's rotary embedding slices
its positions per CP rank (CPU shim 9)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from grpo_batch import add_logprobs, fixed_grpo_batch, gather_full

import spark_mcore.config  # noqa: F401  (loader before component configs)
from spark_mcore.algo.config import AlgoConfig
from spark_mcore.distributed.config import ParallelConfig
from spark_mcore.distributed.launch import spawn_workers
from spark_mcore.distributed.parallel import ParallelState, destroy_distributed, init_distributed
from spark_mcore.models import mcore_tp
from spark_mcore.models.config import ModelConfig
from spark_mcore.trainer.actor import MegatronActor
from spark_mcore.trainer.batching import select
from spark_mcore.trainer.config import TrainerConfig
from spark_mcore.types import TrainBatch

pytestmark = pytest.mark.slow

VOCAB, WORLD, ROWS = 64, 4, 8
LAYOUTS = [("tp2_dp2", 2, 1, 1), ("pp2_dp2", 1, 2, 1), ("tp2pp2", 2, 2, 1), ("dp4", 1, 1, 1),
           ("cp2_dp2", 1, 1, 2), ("tp2cp2", 2, 1, 2), ("pp2cp2", 1, 2, 2)]
METRICS = ["pg_loss", "kl", "entropy", "grad_norm", "clip_frac"]


def _actor(pstate: ParallelState, parallel: ParallelConfig) -> MegatronActor:
    model = ModelConfig(hidden_size=32, num_layers=4, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=64, tie_word_embeddings=True, attention="sdpa")
    trainer = TrainerConfig(micro_batch_size=1, lr=1e-3, warmup_ratio=0.0)
    return MegatronActor(model, trainer, AlgoConfig(kl_coef=0.1, clip_eps=0.2), pstate, VOCAB, parallel)


def _batch() -> TrainBatch:
    """The fixed batch cut to 10 tokens (padded to 12 by the actor at CP2)."""
    batch = fixed_grpo_batch()
    batch.tokens, batch.loss_mask, batch.old_logprobs = (t[:, :10].contiguous() for t in
                                                         (batch.tokens, batch.loss_mask, batch.old_logprobs))
    return batch


def _step(actor: MegatronActor, batch: TrainBatch) -> dict[str, object]:
    actor.setup_optimizer(lr=1e-3, total_steps=10, warmup_steps=0)
    actor.snapshot_reference()
    add_logprobs(actor, batch)
    metrics = actor.train_step(batch)
    return {"old": batch.old_logprobs, "metrics": metrics, "grads": gather_full(actor, "grad"),
            "weights": gather_full(actor, "data")}


def _worker(rank: int, init_path: str, out_dir: str) -> None:
    init = torch.load(init_path)
    for name, tp, pp, cp in LAYOUTS:
        parallel = ParallelConfig(tp=tp, pp=pp, cp=cp)
        pstate = init_distributed(parallel, seed=3)
        actor = _actor(pstate, parallel)
        mcore_tp.load_full_mcore_state(actor.unwrapped, init, pstate.tp_rank, pstate.tp_size)
        per = ROWS // pstate.dp_size
        local = select(_batch(), slice(pstate.dp_rank * per, (pstate.dp_rank + 1) * per))
        result = _step(actor, local)
        result["rows"] = (pstate.dp_rank * per, per)
        torch.save(result, Path(out_dir) / f"{name}_rank{rank}.pt")
        print(f"rank {rank}: {name} done", flush=True)
        dist.barrier()  # the next init_distributed re-creates only megatron's groups


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("actor_layouts")
    pstate = init_distributed(ParallelConfig(), seed=1)
    try:
        actor = _actor(pstate, ParallelConfig())
        init = {k: v.detach().clone() for k, v in mcore_tp.local_state(actor.unwrapped).items()}
        reference = _step(actor, _batch())
    finally:
        destroy_distributed()
    torch.save(init, tmp / "init.pt")
    spawn_workers(_worker, WORLD, args=(str(tmp / "init.pt"), str(tmp)), timeout_s=300)
    return {"dir": tmp, "reference": reference}


@pytest.mark.parametrize("layout", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_grpo_step_matches_world_size_one(runs: dict, layout: tuple) -> None:  # type: ignore[type-arg]
    name = layout[0]
    ref = runs["reference"]
    assert ref["metrics"]["clip_frac"] > 0 and abs(ref["metrics"]["pg_loss"]) > 1e-4
    for rank in range(WORLD):
        res = torch.load(runs["dir"] / f"{name}_rank{rank}.pt")
        first, n = res["rows"]
        assert torch.allclose(res["old"], ref["old"][first:first + n], atol=1e-5)
        for key in METRICS:
            assert res["metrics"][key] == pytest.approx(ref["metrics"][key], abs=1e-5), (rank, key)
        # Adam's first step is lr * g / (|g| + eps): on a near-zero gradient a last-bit difference
        # of g moves the weight by a visible fraction of lr (1e-3), so weights get 2e-5
        for kind, tol in (("grads", 1e-5), ("weights", 2e-5)):
            for gname, value in res[kind].items():
                expected = ref[kind].get(gname, ref[kind]["embedding.word_embeddings.weight"])
                assert (value - expected).abs().max().item() <= tol, (rank, kind, gname)
