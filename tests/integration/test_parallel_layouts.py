"""TP=2, PP=2 and TP2xPP2 on 4 gloo processes give the world-size-1 loss and gradients.

One spawn of 4 processes runs every layout in turn (the data-parallel remainder gets a share
of the micro-batches, so DP=2 is exercised too): TP2 -> dp 2, PP2 -> dp 2, TP2xPP2 -> dp 1.
The reference is computed in the test process at world size 1 with the same schedule code.
Every rank writes its per-micro-batch losses and its TP-merged gradients (global names).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import spark_mcore.config  # noqa: F401  (before component configs: config/__init__ imports them)
from spark_mcore.distributed.config import ParallelConfig
from spark_mcore.distributed.launch import spawn_workers
from spark_mcore.distributed.parallel import ParallelState, destroy_distributed, init_distributed
from spark_mcore.models import mcore_tp
from spark_mcore.models.config import ModelConfig
from spark_mcore.models.registry import get_adapter

pytestmark = pytest.mark.slow  # ~50 s on 2 shared cores (4 spawned processes)

VOCAB, SEQ, MBS, N_MICRO, WORLD = 64, 8, 2, 4, 4
# (name, tp, pp, tied)
LAYOUTS = [("tp2", 2, 1, True), ("pp2", 1, 2, True), ("tp2pp2", 2, 2, True),
           ("tp2pp2_untied", 2, 2, False)]


def _model_cfg(tied: bool) -> ModelConfig:
    return ModelConfig(hidden_size=32, num_layers=4, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=64, tie_word_embeddings=tied, rope_theta=10000.0)


def _loss(tokens: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token cross-entropy, logits [B, T, V/tp] vocab-parallel, tokens [B, T]."""
    from megatron.core import tensor_parallel

    per_token = tensor_parallel.vocab_parallel_cross_entropy(
        logits[:, :-1].float().contiguous(), tokens[:, 1:].contiguous())
    loss = per_token.mean()
    return loss, {"loss": loss.detach().clone()}  # the schedule divides `loss` in place


def _train_step(cfg: ModelConfig, pstate: ParallelState, full: dict[str, torch.Tensor] | None,
                micro: list[torch.Tensor]) -> tuple[torch.nn.Module, list[float]]:
    """Build (and load `full`), run one forward-backward over `micro`; returns (DDP model, losses)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.pipeline_parallel import get_forward_backward_func

    adapter = get_adapter("qwen2")
    model = adapter.build_model(cfg, VOCAB, pre_process=pstate.is_first_stage,
                                post_process=pstate.is_last_stage)
    if full is not None:
        mcore_tp.load_full_mcore_state(model, full, pstate.tp_rank, pstate.tp_size)
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                            use_distributed_optimizer=False)
    ddp = DistributedDataParallel(model.config, ddp_cfg, model)
    model.config.finalize_model_grads_func = finalize_model_grads
    ddp.zero_grad_buffer()

    def step(it: Iterator[torch.Tensor], m: torch.nn.Module):  # type: ignore[no-untyped-def]
        tokens = next(it)
        return adapter.forward(m, tokens), partial(_loss, tokens)

    out = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter(micro), model=[ddp],
        num_microbatches=len(micro), seq_length=SEQ, micro_batch_size=MBS, forward_only=False)
    return ddp, [float(d["loss"]) for d in out] if pstate.is_last_stage else []


def _full_grads(ddp: torch.nn.Module, pstate: ParallelState) -> dict[str, torch.Tensor]:
    """main_grad of every parameter, merged over the TP group, by global name."""
    inner = mcore_tp.unwrap_model(ddp)
    offset = mcore_tp.layer_offset(inner)
    grads = {}
    for name, param in inner.named_parameters():
        g = param.main_grad.detach().clone()
        shards = [torch.empty_like(g) for _ in range(pstate.tp_size)]
        dist.all_gather(shards, g, group=pstate.tp_group)
        gname = mcore_tp.shift_layer_index(name, offset)
        grads[gname] = mcore_tp.merge_tp_shards(gname, shards)
    return grads


def _worker(rank: int, inputs: str, out_dir: str) -> None:
    data = torch.load(inputs)
    for name, tp, pp, tied in LAYOUTS:
        pstate = init_distributed(ParallelConfig(tp=tp, pp=pp), seed=3)
        per = N_MICRO // pstate.dp_size
        first = pstate.dp_rank * per
        micro = data["micro"][first:first + per]
        ddp, losses = _train_step(_model_cfg(tied), pstate, data["full"][tied], micro)
        result = {"losses": {first + i: v for i, v in enumerate(losses)},
                  "grads": _full_grads(ddp, pstate)}
        torch.save(result, Path(out_dir) / f"{name}_rank{rank}.pt")
        dist.barrier()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("layouts")
    gen = torch.Generator().manual_seed(0)
    micro = [torch.randint(0, VOCAB, (MBS, SEQ), generator=gen) for _ in range(N_MICRO)]
    reference, full = {}, {}
    for tied in (True, False):
        pstate = init_distributed(ParallelConfig(), seed=1)
        try:
            ddp, losses = _train_step(_model_cfg(tied), pstate, None, micro)
            full[tied] = {k: v.detach().clone() for k, v in mcore_tp.local_state(ddp).items()}
            reference[tied] = (losses, _full_grads(ddp, pstate))
        finally:
            destroy_distributed()
    torch.save({"micro": micro, "full": full}, tmp / "inputs.pt")
    spawn_workers(_worker, WORLD, args=(str(tmp / "inputs.pt"), str(tmp)), timeout_s=240)
    return {"dir": tmp, "reference": reference}


@pytest.mark.parametrize("layout", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_layout_matches_world_size_one(runs: dict, layout: tuple) -> None:  # type: ignore[type-arg]
    name, tp, pp, tied = layout
    ref_losses, ref_grads = runs["reference"][tied]
    assert len(ref_losses) == N_MICRO and min(ref_losses) > 3.0  # ~ln(64) at init
    losses: dict[int, float] = {}
    checked: set[str] = set()
    for rank in range(WORLD):
        res = torch.load(runs["dir"] / f"{name}_rank{rank}.pt")
        losses.update(res["losses"])
        for gname, grad in res["grads"].items():
            # A tied output_layer on the last stage is megatron's copy of the embedding.
            ref = ref_grads["embedding.word_embeddings.weight" if gname not in ref_grads else gname]
            assert grad.shape == ref.shape, gname
            assert (grad - ref).abs().max().item() <= 1e-5, gname
            checked.add(gname)
    assert sorted(losses) == list(range(N_MICRO))
    for i in range(N_MICRO):
        assert abs(losses[i] - ref_losses[i]) <= 1e-5
    assert set(ref_grads) <= checked
    assert max(g.abs().max().item() for g in ref_grads.values()) > 1e-3  # grads are not all zero
