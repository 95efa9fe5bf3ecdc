"""The Megatron actor: a megatron-core GPTModel (one chunk per virtual pipeline stage with
interleaving) under DDP with Megatron's optimizer, trained with the GRPO loss (or the SFT loss
for the warm start) through megatron's forward-backward schedule, on padded or packed
(`trainer.pack_sequences`) micro-batches.

Parallel groups come in through `ParallelState`; the model and losses never look them up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.pipeline_parallel import get_forward_backward_func

from spark_mcore.algo.config import AlgoConfig
from spark_mcore.algo.losses import grpo_loss, sft_loss
from spark_mcore.config.loader import ConfigError
from spark_mcore.distributed.collectives import broadcast_floats, broadcast_tensor
from spark_mcore.distributed.config import ParallelConfig
from spark_mcore.distributed.context_parallel import split_for_cp
from spark_mcore.distributed.parallel import ParallelState
from spark_mcore.models.config import ModelConfig, StepHeadConfig
from spark_mcore.models.packed import uses_te_attention
from spark_mcore.models.registry import get_adapter
from spark_mcore.models.vision import VisionInputs
from spark_mcore.trainer.config import TrainerConfig
from spark_mcore.trainer.features import check_gpu_features
from spark_mcore.trainer.logits import sequence_entropy, sequence_logprobs
from spark_mcore.trainer.optim import build_optimizer
from spark_mcore.trainer.packing import (
    MicroBatch,
    packed_micro_batches,
    padded_micro_batches,
    sequence_lengths,
)
from spark_mcore.trainer.step_head import StepHeadTrainer, finish_metrics
from spark_mcore.types import TrainBatch

# The interleaved schedule exchanges activations and gradients with both neighbours at once.
# megatron's batched p2p posts [send_prev, recv_prev, send_next, recv_next]; with pp = 2 the
# neighbours are one rank, and where messages between one pair of ranks on one group match in
# posting order (gloo), rank 0's first send (a gradient) lands in rank 1's first receive (an
# activation buffer of the same shape): silently wrong results. megatron's unbatched p2p puts
# the two directions on different groups for a 2-rank pipeline; megatron-LM's own defaults for
# interleaving (overlap_p2p_comm on, batch_p2p_comm off) take that path.
_INTERLEAVED_P2P = {"overlap_p2p_comm": True, "batch_p2p_comm": False}

# (micro-batch sequences [b, T], log-probs [b, T], entropy [b, T] on demand) -> (loss, metrics)
LossFn = Callable[[TrainBatch, torch.Tensor, Callable[[], torch.Tensor]],
                  tuple[torch.Tensor, dict[str, torch.Tensor]]]


class MegatronActor:
    """Owns the policy (DDP-wrapped chunks: one per virtual pipeline stage, else one), its
    optimizer/scheduler and a frozen reference."""

    def __init__(self, model_cfg: ModelConfig, cfg: TrainerConfig, algo: AlgoConfig,
                 pstate: ParallelState, vocab_size: int, parallel: ParallelConfig | None = None,
                 step_head: StepHeadConfig | None = None) -> None:
        self.model_cfg, self.cfg, self.algo, self.pstate = model_cfg, cfg, algo, pstate
        self.adapter = get_adapter(model_cfg.family, model_cfg)
        self.vocab_size = vocab_size
        self.parallel = parallel or ParallelConfig()
        check_packing(cfg, self.parallel)
        check_gpu_features(model_cfg, cfg, self.parallel)
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=self.parallel.use_distributed_optimizer)
        # only the first chunk gets buckets (megatron's convention; without overlap it is moot)
        self.models = [DistributedDataParallel(m.config, ddp_cfg, m, disable_bucketing=i > 0)
                       for i, m in enumerate(self._build_chunks())]
        self.tf_config = self.models[0].module.config  # the schedule reads chunk 0's config
        for chunk in self.chunks:
            chunk.config.finalize_model_grads_func = finalize_model_grads
        self.ref_chunks: list[torch.nn.Module] | None = None
        # GRPO log-probs are of the sampling distribution; `sft_step` uses temperature 1
        self.temperature = 1.0
        self.optimizer: Any = None
        self.scheduler: Any = None
        # the SPRM step head (model.step_head): on the last pipeline stage only
        self.step_head: StepHeadTrainer | None = None
        if model_cfg.step_head and pstate.is_last_stage:
            self.step_head = StepHeadTrainer(step_head or StepHeadConfig(), self.chunks[-1], self.tf_config.num_layers,
                                             self.tf_config.hidden_size, pstate, cfg.seed,
                                             sequence_parallel=self.parallel.sequence_parallel)

    def _build_chunks(self) -> list[torch.nn.Module]:
        """One GPTModel per virtual pipeline stage of this rank (one without interleaving)."""
        overrides = {**self.parallel.transformer_overrides(), **self.cfg.fp8_overrides(),
                     "use_te": self.model_cfg.use_te()}
        if self.cfg.pack_sequences:  # the fused causal softmax ignores an explicit mask
            overrides["masked_softmax_fusion"] = False
        vpp = self.pstate.vp_size
        if vpp is None:
            return [self.adapter.build_model(self.model_cfg, self.vocab_size, pre_process=self.pstate.is_first_stage,
                                             post_process=self.pstate.is_last_stage, **overrides)]
        overrides.update(virtual_pipeline_model_parallel_size=vpp, **_INTERLEAVED_P2P)
        return [self.adapter.build_model(self.model_cfg, self.vocab_size, vp_stage=i,
                                         pre_process=self.pstate.is_first_stage and i == 0,
                                         post_process=self.pstate.is_last_stage and i == vpp - 1, **overrides)
                for i in range(vpp)]

    # ---- setup -------------------------------------------------------------------------------
    def setup_optimizer(self, lr: float, total_steps: int, warmup_steps: int) -> None:
        """(Re)creates Adam + cosine schedule over all chunks; the SFT warm start and RL each get
        their own."""
        self.optimizer, self.scheduler = build_optimizer(
            self.models, self.cfg, lr, total_steps, warmup_steps, bf16=self.model_cfg.dtype == "bf16",
            distributed=self.parallel.use_distributed_optimizer)
        for chunk in self.chunks:
            chunk.config.grad_scale_func = self.optimizer.scale_loss

    def snapshot_reference(self) -> None:
        """Freezes a copy of the current policy as the reference of the KL term and of SPRO
        (no-op when neither needs it: `AlgoConfig.needs_reference`)."""
        if not self.algo.needs_reference:
            self.ref_chunks = None
            return
        if self.ref_chunks is None:  # modules hold process groups, so build twins instead of deepcopy
            self.ref_chunks = self._build_chunks()
        for ref, chunk in zip(self.ref_chunks, self.chunks, strict=True):
            ref.load_state_dict(chunk.state_dict())
            ref.eval()
            for p in ref.parameters():
                p.requires_grad_(False)

    def hf_config(self, tokenizer: Any) -> Any:
        """The transformers config matching this policy (for engines and HF export)."""
        return self.adapter.hf_config(self.model_cfg, self.vocab_size, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)

    @property
    def chunks(self) -> list[torch.nn.Module]:
        """The policy's GPTModel chunks of this rank, in virtual-stage order (DDP unwrapped)."""
        return [m.module for m in self.models]

    @property
    def unwrapped(self) -> torch.nn.Module:
        """The policy's GPTModel; only without virtual pipeline (otherwise use `chunks`)."""
        return _single(self.chunks, "actor.chunks")

    @property
    def ref(self) -> torch.nn.Module | None:
        """The frozen reference model (None when KL is off); only without virtual pipeline
        (otherwise use `ref_chunks`)."""
        return None if self.ref_chunks is None else _single(self.ref_chunks, "actor.ref_chunks")

    def sharded_state_dict(self, reference: bool = False) -> dict[str, Any]:
        """megatron dist-checkpoint state of the policy (or reference): one chunk's
        `sharded_state_dict` as is, several chunks under "model0", "model1", ... (megatron's
        convention). Keys of the ShardedTensors carry global layer offsets, so a checkpoint
        saved under one (virtual) pipeline layout loads under another."""
        chunks = self.ref_chunks if reference else self.chunks
        if chunks is None:
            raise RuntimeError("no reference model: call snapshot_reference() with algo.kl_coef > 0")
        if len(chunks) == 1:
            return chunks[0].sharded_state_dict(prefix="")
        return {f"model{i}": c.sharded_state_dict(prefix="") for i, c in enumerate(chunks)}

    def load_state_dict(self, state: dict[str, Any], reference: bool = False) -> None:
        """Inverse of `sharded_state_dict` for the dict `dist_checkpointing.load` returns."""
        chunks = self.ref_chunks if reference else self.chunks
        if chunks is None:
            raise RuntimeError("no reference model: call snapshot_reference() with algo.kl_coef > 0")
        if len(chunks) == 1:
            chunks[0].load_state_dict(state)
            return
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(state[f"model{i}"])

    # ---- forward / backward ------------------------------------------------------------------
    def _forward_step(self, loss_fn: LossFn, norm: torch.Tensor, data_iterator: Iterator[MicroBatch],
                      model: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
        mb = next(data_iterator)
        images = VisionInputs.from_rows(mb.seqs.images)
        if images is not None:  # vision-language rows (padded micro-batches only)
            output = self.adapter.forward(model, self._model_tokens(mb.tokens), images=images.to(mb.tokens.device))
        elif mb.packed is None:
            output = self.adapter.forward(model, self._model_tokens(mb.tokens))
        else:
            output = self.adapter.forward(model, mb.tokens, packed=mb.packed)
        return output, partial(self._loss_wrapper, loss_fn, mb, norm)

    def _loss_wrapper(self, loss_fn: LossFn, mb: MicroBatch, norm: torch.Tensor,
                      logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if mb.num_sequences == 0:  # a filler micro-batch (interleaved schedule): no loss, no metrics
            if self.step_head is not None:
                self.step_head.loss(mb.seqs, mb.unpack, mb.tokens.shape)  # drops the captured state
            return logits.sum() * 0.0, {}
        logp = mb.unpack(sequence_logprobs(logits, mb.tokens, self.pstate, self.temperature,
                                            self.algo.logprob_chunk_tokens))
        loss, metrics = loss_fn(mb.seqs, logp, partial(self._entropy, mb, logits))
        # Each micro-batch returns its share of the global mean: summing the shares over
        # micro-batches and DP ranks reproduces the full-batch loss exactly. Megatron divides by
        # the micro-batch count and DDP averages over DP ranks, so both are multiplied back.
        # With context parallelism every CP rank computes this same loss from gathered log-probs
        # and back-propagates only through its own positions; DDP averages over DP x CP ranks and
        # megatron's schedule multiplies the loss by the CP size to undo the CP part.
        share = self._weight(mb.seqs) / norm
        scaled = loss * share * self._num_mb * self.pstate.dp_size
        head = None if self.step_head is None else self.step_head.loss(mb.seqs, mb.unpack, mb.tokens.shape)
        if head is not None:  # already this micro-batch's share of the global head loss
            scaled = scaled + head * self._num_mb * self.pstate.dp_size
        # keys starting with "_" are per-token outputs (log-probs), passed through unscaled
        return scaled, {k: v.detach().float() * (1.0 if k.startswith("_") else share)
                        for k, v in metrics.items()}

    def _entropy(self, mb: MicroBatch, logits: torch.Tensor) -> torch.Tensor:
        """[b, T] entropy of the distribution that predicted each token (0 at t = 0), no grad."""
        return mb.unpack(sequence_entropy(logits, mb.tokens.shape[1], self.pstate, self.temperature,
                                          self.algo.logprob_chunk_tokens))

    def _model_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Padded rows [b, T] -> the model's input: right-padded to `_seq_multiple()` (pad id 0;
        causal attention keeps real positions unaffected) and, with context parallelism, this CP
        rank's load-balanced split."""
        pad = -tokens.shape[1] % self._seq_multiple()
        if pad:
            tokens = torch.nn.functional.pad(tokens, (0, pad))
        return split_for_cp(tokens, self.pstate.cp_size, self.pstate.cp_rank)

    def _weight(self, mb: TrainBatch) -> torch.Tensor:
        """The micro-batch's part of the global normaliser: scored tokens, or for seq_mean the
        sequences with >= 1 scored token (what `aggregate` averages over; padding rows add 0)."""
        if self.algo.loss_agg == "seq_mean":
            return (mb.loss_mask.sum(dim=1) > 0).sum().float()
        return mb.loss_mask[:, 1:].sum()

    def _global_norm(self, batch: TrainBatch) -> torch.Tensor:
        local = self._weight(batch).to(self.pstate.device, torch.float32)
        if self.pstate.dp_size > 1:
            torch.distributed.all_reduce(local, group=self.pstate.dp_group)
        return local.clamp(min=1.0)

    def _micro_batches(self, batch: TrainBatch) -> list[MicroBatch]:
        """Equal-shape micro-batches (pipeline p2p needs one shape): padded rows, or packed
        rows with `trainer.pack_sequences`. Their count is a multiple of pp under the
        interleaved schedule (megatron requires it); fillers carry no sequences."""
        multiple = self.pstate.pp_size if self.pstate.vp_size else 1
        budget = self.cfg.max_tokens_per_micro_batch
        if self.cfg.pack_sequences and any(i is not None for i in batch.images):
            raise ConfigError("trainer.pack_sequences=true does not take image rows yet; set "
                              "trainer.pack_sequences=false for vision-language batches")
        if self.cfg.pack_sequences:
            longest = int(sequence_lengths(batch).max())
            row_length = -(-max(budget, longest) // self._seq_multiple()) * self._seq_multiple()
            return packed_micro_batches(batch, row_length, 1 if budget else self.cfg.micro_batch_size, multiple)
        size = min(self.cfg.micro_batch_size, batch.num_sequences)
        if budget:  # token budget: rows of the (padded) length T
            size = max(1, min(size, budget // batch.tokens.shape[1]))
        return padded_micro_batches(batch, size, multiple)

    def _seq_multiple(self) -> int:
        """Sequence parallelism splits the sequence dimension over TP ranks, context parallelism
        into 2 x CP chunks; FP8 GEMMs want token counts in multiples of 16."""
        sp = self.pstate.tp_size if self.parallel.sequence_parallel else 1
        multiple = math.lcm(sp, 2 * self.pstate.cp_size if self.pstate.cp_size > 1 else 1)
        return math.lcm(multiple, 16) if self.cfg.fp8 else multiple

    def _run(self, chunks: list[torch.nn.Module], batch: TrainBatch, loss_fn: LossFn,
             forward_only: bool) -> tuple[list[dict[str, torch.Tensor]], list[MicroBatch]]:
        """Megatron's schedule (interleaved with several chunks) over `_micro_batches(batch)`.
        Returns the loss-function outputs, one per micro-batch in order on the last pipeline
        stage (empty elsewhere), and the micro-batches."""
        mbs = [mb.to(self.pstate.device) for mb in self._micro_batches(batch)]
        self._num_mb = len(mbs)
        norm = self._global_norm(batch)
        rows, length = mbs[0].tokens.shape
        if mbs[0].packed is not None and uses_te_attention(chunks[0]):  # THD: one [1, R*L] sequence
            rows, length = 1, rows * length
        elif mbs[0].packed is None:  # full padded length; megatron divides it by CP (and SP) itself
            length = -(-length // self._seq_multiple()) * self._seq_multiple()
        # every chunk reads the same micro-batches in order; the interleaved schedule wants a list
        data: Any = [iter(mbs) for _ in chunks] if self.pstate.vp_size else iter(mbs)
        outs = get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, loss_fn, norm), data_iterator=data,
            model=chunks, num_microbatches=len(mbs), seq_length=length, micro_batch_size=rows,
            forward_only=forward_only)
        return outs, mbs

    def _last_stage_rank(self) -> int:
        return torch.distributed.get_process_group_ranks(self.pstate.pp_group)[-1]

    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch, reference: bool = False) -> torch.Tensor:
        """log p(tokens[t] | tokens[<t]) for every position, [B, T] (0 at t = 0 and padding)."""
        return self._forward_values(batch, reference, entropy=False)[0]

    @torch.no_grad()
    def compute_logprobs_entropy(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy's log-probs and the entropy of the distribution that predicted each token
        (vocab-parallel under TP), both [B, T] and 0 off the loss mask; one forward pass."""
        logp, ent = self._forward_values(batch, False, entropy=True)
        assert ent is not None
        return logp, ent

    def _forward_values(self, batch: TrainBatch, reference: bool, entropy: bool
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        chunks = self.ref_chunks if reference else self.chunks
        if chunks is None:
            raise RuntimeError("no reference model: call snapshot_reference() with algo.kl_coef > 0")
        modes = [c.training for c in chunks]
        for c in chunks:
            c.eval()
        outs, mbs = self._run(chunks, batch, lambda mb, logp, ent: (logp.sum() * 0, {"_logp": logp, **(
            {"_ent": ent()} if entropy else {})}), True)
        for c, mode in zip(chunks, modes, strict=True):
            c.train(mode)
        values = []
        for key in ["_logp", "_ent"] if entropy else ["_logp"]:
            full = None
            if outs:  # scatter each micro-batch's sequences back to their batch rows
                full = torch.zeros(batch.tokens.shape, dtype=torch.float32)
                for mb, out in zip(mbs, outs, strict=True):
                    keep = mb.index >= 0
                    if key in out and bool(keep.any()):
                        full[mb.index[keep].cpu()] = out[key][keep.to(out[key].device)].float().cpu()
            # the loss lives on the last pipeline stage; every stage gets the values for symmetry
            full = broadcast_tensor(full, tuple(batch.tokens.shape), torch.float32, self._last_stage_rank(),
                                    self.pstate.pp_group, self.pstate.device)
            values.append(full * batch.loss_mask)
        return values[0], values[1] if entropy else None

    def _grpo_loss_fn(self, mb: TrainBatch, logp: torch.Tensor, entropy: Callable[[], torch.Tensor],
                      algo: AlgoConfig | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        old = mb.old_logprobs if mb.old_logprobs is not None else logp.detach()
        return grpo_loss(logp, old, mb.ref_logprobs, mb.advantages, mb.loss_mask, algo or self.algo, entropy=entropy(),
                         engine_logp=mb.engine_logprobs, prefix=mb.prefix_mask)

    def _sft_loss_fn(self, mb: TrainBatch, logp: torch.Tensor, entropy: Callable[[], torch.Tensor]
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = sft_loss(logp, mb.loss_mask)
        return loss, {"sft_loss": loss.detach()}

    def _optimize(self, batch: TrainBatch, loss_fn: LossFn, head: bool = False,
                  lr_scale: float = 1.0) -> dict[str, float]:
        """One optimizer step; `lr_scale` multiplies the scheduled learning rate of this step
        only (the scheduler sets every group's lr again afterwards)."""
        for model in self.models:
            model.train()
            model.zero_grad_buffer()
        self.optimizer.zero_grad()
        head = head and self.step_head is not None and self.step_head.begin(batch)
        outs, _ = self._run(self.models, batch, loss_fn, forward_only=False)
        scheduled = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] *= lr_scale
        ok, grad_norm, _ = self.optimizer.step()
        for group, lr in zip(self.optimizer.param_groups, scheduled, strict=True):
            group["lr"] = lr
        self.scheduler.step(increment=1)
        metrics: dict[str, float] = {}
        for out in outs:
            for k, v in out.items():
                metrics[k] = metrics.get(k, 0.0) + float(v)
        if head:  # the head steps after the policy (skipped with it on an fp16 overflow)
            metrics.update(self.step_head.finish(float(self.optimizer.get_loss_scale()), bool(ok)))
        # per-micro-batch shares were summed on this DP rank; the batch mean sums over DP ranks
        metrics = self._reduce_metrics(metrics if self.pstate.is_last_stage else None)
        metrics.update(finish_metrics({k: metrics.pop(k) for k in list(metrics) if k.startswith("step_head/")}))
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else 0.0
        metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
        metrics["update_skipped"] = 0.0 if ok else 1.0
        return metrics

    def _reduce_metrics(self, metrics: dict[str, float] | None) -> dict[str, float]:
        metrics = broadcast_floats(metrics, self._last_stage_rank(), self.pstate.pp_group, self.pstate.device)
        if self.pstate.dp_size > 1 and metrics:
            keys = sorted(metrics)
            values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.pstate.device)
            torch.distributed.all_reduce(values, group=self.pstate.dp_group)
            metrics = dict(zip(keys, values.cpu().tolist(), strict=False))
        return metrics

    def train_step(self, batch: TrainBatch, lr_scale: float = 1.0, kl_coef: float | None = None) -> dict[str, float]:
        """One optimizer step of GRPO on `batch` (old/ref log-probs already filled in), at
        `lr_scale` times the scheduled learning rate (SPARK's `spark.reward_lr_scale`), with
        `kl_coef` in place of algo.kl_coef for this step when given (`spark.reward_kl_coef`)."""
        if kl_coef is None or kl_coef == self.algo.kl_coef:
            return self._optimize(batch, self._grpo_loss_fn, head=True, lr_scale=lr_scale)
        if kl_coef > 0 and self.ref_chunks is None:
            raise RuntimeError("no reference model: call snapshot_reference() with algo.kl_coef > 0")
        # this step's loss alone sees the other coefficient; the actor's config is not touched
        loss_fn = partial(self._grpo_loss_fn, algo=replace(self.algo, kl_coef=kl_coef))
        return self._optimize(batch, loss_fn, head=True, lr_scale=lr_scale)

    def sft_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step of next-token likelihood on the masked (response) tokens."""
        sampling_temperature, self.temperature = self.temperature, 1.0
        try:
            return self._optimize(batch, self._sft_loss_fn)
        finally:
            self.temperature = sampling_temperature

    def export_hf(self) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named full tensors of the current policy (world size 1; `weights/` gathers TP/PP)."""
        return self.adapter.export_hf_state(self.unwrapped)


def _single(chunks: list[torch.nn.Module], plural: str) -> torch.nn.Module:
    if len(chunks) != 1:
        raise RuntimeError(f"the policy has {len(chunks)} virtual-pipeline chunks on this rank; use {plural}")
    return chunks[0]


def check_packing(cfg: TrainerConfig, parallel: ParallelConfig) -> None:
    """trainer.pack_sequences limits, named by field (the local spec cannot split a packed
    row's mask over context-parallel ranks)."""
    if cfg.pack_sequences and parallel.cp > 1:
        raise ConfigError("trainer.pack_sequences=true with parallel.cp > 1 needs Transformer Engine's THD "
                          "attention, which the actor's local layer spec does not use; set parallel.cp=1 "
                          "or trainer.pack_sequences=false")
