"""The actor's GRPO step on 2 gloo processes equals world size 1 (padded): PP2 x VPP2 through
megatron's interleaved schedule (4 layers, 4 one-layer chunks), the same with packed
sequences (a filler micro-batch pads the count to a multiple of pp), and TP2 with packed
sequences. Compared: old log-probs, loss metrics, merged gradients, the weights after one
optimizer step and their HF export (fp32, within 1e-5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from grpo_batch import add_logprobs, fixed_grpo_batch, gather_full

import spark_mcore.config  # noqa: F401  (loader before component configs)
from spark_mcore.algo.config import AlgoConfig
from spark_mcore.checkpoint.io import load_actor_state, write_checkpoint
from spark_mcore.distributed.config import ParallelConfig
from spark_mcore.distributed.launch import spawn_workers
from spark_mcore.distributed.parallel import ParallelState, destroy_distributed, init_distributed
from spark_mcore.models import mcore_tp
from spark_mcore.models.config import ModelConfig
from spark_mcore.trainer.actor import MegatronActor
from spark_mcore.trainer.config import TrainerConfig
from spark_mcore.types import TrainBatch
from spark_mcore.weights.export import iter_hf_weights

pytestmark = pytest.mark.slow

VOCAB, WORLD, ROWS = 64, 2, 8
# name, tp, pp, virtual pipeline size, pack_sequences
LAYOUTS = [("pp2_vpp2", 1, 2, 2, False), ("pp2_vpp2_packed", 1, 2, 2, True), ("tp2_packed", 2, 1, None, True)]
METRICS = ["pg_loss", "kl", "entropy", "grad_norm", "clip_frac"]


def _actor(pstate: ParallelState, pack: bool) -> MegatronActor:
    model = ModelConfig(hidden_size=32, num_layers=4, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=64, tie_word_embeddings=True)
    # packed: rows of 32 tokens, one per micro-batch -> 3 rows for this batch (+1 filler under PP2)
    trainer = TrainerConfig(micro_batch_size=1, lr=1e-3, warmup_ratio=0.0, pack_sequences=pack,
                            max_tokens_per_micro_batch=32 if pack else 0)
    return MegatronActor(model, trainer, AlgoConfig(kl_coef=0.1, clip_eps=0.2), pstate, VOCAB)


def _step(actor: MegatronActor, batch: TrainBatch) -> dict[str, object]:
    actor.setup_optimizer(lr=1e-3, total_steps=10, warmup_steps=0)
    actor.snapshot_reference()
    add_logprobs(actor, batch)
    metrics = actor.train_step(batch)
    # HF export of the updated policy: each rank's chunks under global HF layer names
    hf = {k: v.clone() for k, v in iter_hf_weights(actor.chunks, actor.adapter, actor.pstate.tp_group,
                                                   actor.pstate.tp_size)}
    return {"old": batch.old_logprobs, "metrics": metrics, "grads": gather_full(actor, "grad"),
            "weights": gather_full(actor, "data"), "hf": hf}


def _worker(rank: int, init_path: str, out_dir: str) -> None:
    init = torch.load(init_path)
    for name, tp, pp, vpp, pack in LAYOUTS:
        pstate = init_distributed(ParallelConfig(tp=tp, pp=pp, virtual_pipeline_size=vpp), seed=3)
        actor = _actor(pstate, pack)
        for chunk in actor.chunks:
            mcore_tp.load_full_mcore_state(chunk, init, pstate.tp_rank, pstate.tp_size)
        result = _step(actor, fixed_grpo_batch())
        result["layers"] = [mcore_tp.layer_offset(c) for c in actor.chunks]
        if name == "pp2_vpp2":  # per-chunk dist checkpoint ("model0", "model1"), resumed at world size 1
            write_checkpoint(actor, Path(out_dir) / "ckpt", step=1)
        torch.save(result, Path(out_dir) / f"{name}_rank{rank}.pt")
        dist.barrier()  # the next init_distributed re-creates only megatron's groups


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("actor_interleaved")
    pstate = init_distributed(ParallelConfig(), seed=1)
    try:
        actor = _actor(pstate, pack=False)
        init = {k: v.detach().clone() for k, v in mcore_tp.local_state(actor.unwrapped).items()}
        reference = _step(actor, fixed_grpo_batch())
    finally:
        destroy_distributed()
    torch.save(init, tmp / "init.pt")
    spawn_workers(_worker, WORLD, args=(str(tmp / "init.pt"), str(tmp)), timeout_s=300)
    return {"dir": tmp, "reference": reference, "resumed": _resume_at_world_size_one(init, tmp / "ckpt" / "step_1")}


def _resume_at_world_size_one(init: dict[str, torch.Tensor], ckpt: Path) -> dict[str, object]:
    """A second GRPO step of the uninterrupted world-size-1 run, and of a world-size-1 actor
    (another seed) that resumed the PP2 x VPP2 checkpoint written after the first step."""
    pstate = init_distributed(ParallelConfig(), seed=5)
    try:
        cont = _actor(pstate, pack=False)
        mcore_tp.load_full_mcore_state(cont.unwrapped, init)
        _step(cont, fixed_grpo_batch())
        expected = cont.train_step(_second_batch(cont))
        resumed = _actor(pstate, pack=False)
        resumed.setup_optimizer(lr=1e-3, total_steps=10, warmup_steps=0)
        resumed.snapshot_reference()
        load_actor_state(resumed, ckpt)
        theirs, ours = mcore_tp.local_state(cont.ref), mcore_tp.local_state(resumed.ref)
        same_ref = theirs.keys() == ours.keys() and all(torch.equal(ours[k], v) for k, v in theirs.items())
        return {"expected": expected, "got": resumed.train_step(_second_batch(resumed)), "same_ref": same_ref}
    finally:
        destroy_distributed()


def _second_batch(actor: MegatronActor) -> TrainBatch:
    batch = fixed_grpo_batch()
    add_logprobs(actor, batch)
    return batch


@pytest.mark.parametrize("layout", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_step_matches_world_size_one(runs: dict, layout: tuple) -> None:  # type: ignore[type-arg]
    name, _, pp, vpp, _ = layout
    ref = runs["reference"]
    assert ref["metrics"]["clip_frac"] > 0 and abs(ref["metrics"]["pg_loss"]) > 1e-4
    seen: set[str] = set()
    exported: set[str] = set()
    for rank in range(WORLD):
        res = torch.load(runs["dir"] / f"{name}_rank{rank}.pt")
        if vpp:  # rank r holds layers r and r + pp: one layer per chunk, interleaved
            assert res["layers"] == [rank, rank + pp]
        assert (res["old"] - ref["old"]).abs().max() <= 1e-5
        for key in METRICS:
            assert res["metrics"][key] == pytest.approx(ref["metrics"][key], abs=1e-5), (rank, key)
        for kind in ("grads", "weights"):
            for gname, value in res[kind].items():
                expected = ref[kind].get(gname, ref[kind]["embedding.word_embeddings.weight"])
                assert (value - expected).abs().max().item() <= 1e-5, (rank, kind, gname)
        for hf_name, value in res["hf"].items():
            assert (value - ref["hf"][hf_name]).abs().max().item() <= 1e-5, (rank, hf_name)
        seen |= set(res["grads"])
        exported |= set(res["hf"])
    assert seen >= set(ref["grads"])  # the ranks' chunks together hold every parameter
    assert exported == set(ref["hf"])  # ... and export every HF weight


def test_interleaved_checkpoint_resumes_at_world_size_one(runs: dict) -> None:  # type: ignore[type-arg]
    res = runs["resumed"]
    assert res["same_ref"]
    for key in [*METRICS, "lr"]:
        assert res["got"][key] == pytest.approx(res["expected"][key], abs=1e-5), key
