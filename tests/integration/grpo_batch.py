"""What the multi-process actor tests share (not a test module): the fixed GRPO batch they
compare layouts on, full (TP-merged, globally named) parameters or gradients, and an actor
whose whole training state (Adam, LR schedule, reference) a checkpoint must carry."""

from __future__ import annotations

import torch
import torch.distributed as dist

import spark_mcore.config  # noqa: F401  (loader before component configs)
from spark_mcore.algo.config import AlgoConfig
from spark_mcore.distributed.config import ParallelConfig
from spark_mcore.distributed.parallel import ParallelState
from spark_mcore.models import mcore_tp
from spark_mcore.models.config import ModelConfig
from spark_mcore.trainer.actor import MegatronActor
from spark_mcore.trainer.batching import select
from spark_mcore.trainer.config import TrainerConfig
from spark_mcore.types import TrainBatch

VOCAB, ROWS, WIDTH = 64, 8, 12


def fixed_grpo_batch() -> TrainBatch:
    """8 rows of 12 tokens with varied prompt/response spans and trailing padding. old_logprobs
    holds a per-token offset, added to the actor's own log-probs by the tests: a perturbed "old"
    policy makes the PPO ratio differ from 1, so clipping is exercised (rows carry their offsets
    under DP)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, VOCAB, (ROWS, WIDTH), generator=g)
    mask = torch.zeros(ROWS, WIDTH)
    for i in range(ROWS):
        start, end = 3 + i % 3, WIDTH - i % 4
        mask[i, start:end] = 1
        tokens[i, end:] = 0
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.5, -1.5, 0.0, 2.0])
    offset = 0.3 * torch.sign(torch.sin(torch.arange(tokens.numel()).view_as(tokens).float()))
    return TrainBatch(tokens=tokens, loss_mask=mask, advantages=adv, old_logprobs=offset)


def dp_rows(batch: TrainBatch, pstate: ParallelState) -> TrainBatch:
    """This data-parallel rank's contiguous share of the rows."""
    per = batch.num_sequences // pstate.dp_size
    return select(batch, slice(pstate.dp_rank * per, (pstate.dp_rank + 1) * per))


def gather_full(actor: MegatronActor, attr: str) -> dict[str, torch.Tensor]:
    """Parameter data or main_grad of every chunk, merged over TP, by global name."""
    out = {}
    for chunk in actor.chunks:
        offset = mcore_tp.layer_offset(chunk)
        for name, param in chunk.named_parameters():
            local = (param.main_grad if attr == "grad" else param.data).detach().clone()
            shards = [torch.empty_like(local) for _ in range(actor.pstate.tp_size)]
            dist.all_gather(shards, local, group=actor.pstate.tp_group)
            gname = mcore_tp.shift_layer_index(name, offset)
            out[gname] = mcore_tp.merge_tp_shards(gname, shards)
    return out


def add_logprobs(actor: MegatronActor, batch: TrainBatch) -> TrainBatch:
    """Fills old log-probs (the actor's own plus the batch's per-token offset, so the PPO ratio
    is not 1) and the reference's, as the loop does before a GRPO step."""
    batch.old_logprobs = actor.compute_logprobs(batch) + batch.loss_mask * batch.old_logprobs
    batch.ref_logprobs = actor.compute_logprobs(batch, reference=True)
    return batch


def stateful_actor(model: ModelConfig, pstate: ParallelState, parallel: ParallelConfig | None = None,
                   init: dict[str, torch.Tensor] | None = None) -> MegatronActor:
    """Adam + a warmup/cosine schedule (so the LR depends on the restored step count) and a KL
    reference; `init` (full tensors) replaces the seed's random weights before both."""
    actor = MegatronActor(model, TrainerConfig(micro_batch_size=2, lr=1e-3), AlgoConfig(kl_coef=0.1, clip_eps=0.2),
                          pstate, VOCAB, parallel)
    if init is not None:
        mcore_tp.load_full_mcore_state(actor.unwrapped, init, pstate.tp_rank, pstate.tp_size)
    actor.setup_optimizer(lr=1e-3, total_steps=10, warmup_steps=2)
    actor.snapshot_reference()
    return actor


def grpo_step(actor: MegatronActor) -> dict[str, float]:
    """One GRPO step on this DP rank's rows of the fixed batch; returns the step's metrics."""
    batch = dp_rows(fixed_grpo_batch(), actor.pstate)
    add_logprobs(actor, batch)
    return actor.train_step(batch)
