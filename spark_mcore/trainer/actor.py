"""The Megatron actor: a megatron-core GPTModel under DDP with Megatron's optimizer, trained with
the GRPO loss (or the SFT loss for the warm start) through megatron's forward-backward schedule.

Parallel groups come in through `ParallelState`; the model and losses never look them up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
from spark_mcore.algo.logprobs import vocab_parallel_entropy
from spark_mcore.algo.losses import grpo_loss, sft_loss
from spark_mcore.distributed.collectives import broadcast_floats, broadcast_tensor
from spark_mcore.distributed.config import ParallelConfig
from spark_mcore.distributed.parallel import ParallelState
from spark_mcore.models.config import ModelConfig
from spark_mcore.models.registry import get_adapter
from spark_mcore.trainer.batching import micro_batches, pad_rows
from spark_mcore.trainer.config import TrainerConfig
from spark_mcore.trainer.logits import sequence_logprobs
from spark_mcore.trainer.optim import build_optimizer
from spark_mcore.types import TrainBatch

LossFn = Callable[[TrainBatch, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class MegatronActor:
    """Owns the policy (DDP-wrapped chunks), its optimizer/scheduler and a frozen reference."""

    def __init__(self, model_cfg: ModelConfig, cfg: TrainerConfig, algo: AlgoConfig,
                 pstate: ParallelState, vocab_size: int, parallel: ParallelConfig | None = None) -> None:
        self.model_cfg, self.cfg, self.algo, self.pstate = model_cfg, cfg, algo, pstate
        self.adapter = get_adapter(model_cfg.family, model_cfg)
        self.vocab_size = vocab_size
        self.parallel = parallel or ParallelConfig()
        module = self._build_module()
        self.tf_config = module.config
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=self.parallel.use_distributed_optimizer)
        self.model = DistributedDataParallel(self.tf_config, ddp_cfg, module)
        self.tf_config.finalize_model_grads_func = finalize_model_grads
        self.ref: torch.nn.Module | None = None
        # GRPO log-probs are of the sampling distribution; `sft_step` uses temperature 1
        self.temperature = 1.0
        self.optimizer: Any = None
        self.scheduler: Any = None

    def _build_module(self) -> torch.nn.Module:
        return self.adapter.build_model(self.model_cfg, self.vocab_size, pre_process=self.pstate.is_first_stage,
                                        post_process=self.pstate.is_last_stage,
                                        **self.parallel.transformer_overrides())

    # ---- setup -------------------------------------------------------------------------------
    def setup_optimizer(self, lr: float, total_steps: int, warmup_steps: int) -> None:
        """(Re)creates Adam + cosine schedule; the SFT warm start and RL each get their own."""
        self.optimizer, self.scheduler = build_optimizer(
            [self.model], self.cfg, lr, total_steps, warmup_steps, bf16=self.model_cfg.dtype == "bf16",
            distributed=self.parallel.use_distributed_optimizer)
        self.tf_config.grad_scale_func = self.optimizer.scale_loss

    def snapshot_reference(self) -> None:
        """Freezes a copy of the current policy as the KL reference (no-op when kl_coef == 0)."""
        if self.algo.kl_coef == 0:
            self.ref = None
            return
        if self.ref is None:  # modules hold process groups, so build a twin instead of deepcopy
            self.ref = self._build_module()
        self.ref.load_state_dict(self.model.module.state_dict())
        self.ref.eval()
        for p in self.ref.parameters():
            p.requires_grad_(False)

    def hf_config(self, tokenizer: Any) -> Any:
        """The transformers config matching this policy (for engines and HF export)."""
        return self.adapter.hf_config(self.model_cfg, self.vocab_size, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.model.module

    # ---- forward / backward ------------------------------------------------------------------
    def _forward_step(self, loss_fn: LossFn, norm: torch.Tensor, data_iterator: Iterator[TrainBatch],
                      model: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
        mb = next(data_iterator)
        output = self.adapter.forward(model, mb.tokens)
        return output, partial(self._loss_wrapper, loss_fn, mb, norm)

    def _loss_wrapper(self, loss_fn: LossFn, mb: TrainBatch, norm: torch.Tensor,
                      logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logp = sequence_logprobs(logits, mb.tokens, self.pstate, self.temperature)
        loss, metrics = loss_fn(mb, logp, logits)
        # Each micro-batch returns its share of the global mean: summing the shares over
        # micro-batches and DP ranks reproduces the full-batch loss exactly. Megatron divides by
        # the micro-batch count and DDP averages over DP ranks, so both are multiplied back.
        share = self._weight(mb) / norm
        scaled = loss * share * self._num_mb * self.pstate.dp_size
        # keys starting with "_" are per-token outputs (log-probs), passed through unscaled
        return scaled, {k: v.detach().float() * (1.0 if k.startswith("_") else share)
                        for k, v in metrics.items()}

    def _weight(self, mb: TrainBatch) -> torch.Tensor:
        if self.algo.loss_agg == "seq_mean":
            return torch.tensor(float(mb.num_sequences))
        return mb.loss_mask[:, 1:].sum()

    def _global_norm(self, batch: TrainBatch) -> torch.Tensor:
        local = self._weight(batch).clone()
        if self.pstate.dp_size > 1:
            torch.distributed.all_reduce(local, group=self.pstate.dp_group)
        return local.clamp(min=1.0)

    def _run(self, model: torch.nn.Module, batch: TrainBatch, loss_fn: LossFn,
             forward_only: bool) -> list[dict[str, torch.Tensor]]:
        """Megatron's schedule over equal micro-batches (pipeline p2p needs one shape); the
        last one is padded with mask-0 rows, which add nothing to losses or metrics.
        Returns the loss-function outputs (non-empty on the last pipeline stage only)."""
        size = min(self.cfg.micro_batch_size, batch.num_sequences)
        if self.cfg.max_tokens_per_micro_batch:  # token budget: rows of the (padded) length T
            size = max(1, min(size, self.cfg.max_tokens_per_micro_batch // batch.tokens.shape[1]))
        mbs = list(micro_batches(pad_rows(batch, size), size))
        self._num_mb = len(mbs)
        norm = self._global_norm(batch)
        fb = get_forward_backward_func()
        return fb(forward_step_func=partial(self._forward_step, loss_fn, norm), data_iterator=iter(mbs),
                  model=[model], num_microbatches=len(mbs), seq_length=batch.tokens.shape[1],
                  micro_batch_size=size, forward_only=forward_only)

    def _last_stage_rank(self) -> int:
        return torch.distributed.get_process_group_ranks(self.pstate.pp_group)[-1]

    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch, reference: bool = False) -> torch.Tensor:
        """log p(tokens[t] | tokens[<t]) for every position, [B, T] (0 at t = 0 and padding)."""
        model = self.ref if reference else self.model.module
        if model is None:
            raise RuntimeError("no reference model: call snapshot_reference() with algo.kl_coef > 0")
        was_training = model.training
        model.eval()
        outs = self._run(model, batch, lambda mb, logp, logits: (logp.sum() * 0, {"_logp": logp}), True)
        model.train(was_training)
        logp = torch.cat([out["_logp"] for out in outs])[: batch.num_sequences] if outs else None
        # the loss lives on the last pipeline stage; every stage gets the values for symmetry
        logp = broadcast_tensor(logp, tuple(batch.tokens.shape), torch.float32, self._last_stage_rank(),
                                self.pstate.pp_group)
        return logp * batch.loss_mask

    def _grpo_loss_fn(self, mb: TrainBatch, logp: torch.Tensor, logits: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = mb.loss_mask
        old = mb.old_logprobs if mb.old_logprobs is not None else logp.detach()
        with torch.no_grad():
            tp_group = self.pstate.tp_group if self.pstate.tp_size > 1 else None
            ent = vocab_parallel_entropy(logits.detach()[:, :-1], tp_group, temperature=self.temperature)
        ent_full = torch.nn.functional.pad(ent, (1, 0))
        return grpo_loss(logp, old, mb.ref_logprobs, mb.advantages, mask, self.algo, entropy=ent_full)

    def _sft_loss_fn(self, mb: TrainBatch, logp: torch.Tensor, logits: torch.Tensor
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = sft_loss(logp, mb.loss_mask)
        return loss, {"sft_loss": loss.detach()}

    def _optimize(self, batch: TrainBatch, loss_fn: LossFn) -> dict[str, float]:
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outs = self._run(self.model, batch, loss_fn, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        metrics: dict[str, float] = {}
        for out in outs:
            for k, v in out.items():
                metrics[k] = metrics.get(k, 0.0) + float(v)
        # per-micro-batch shares were summed on this DP rank; the batch mean sums over DP ranks
        metrics = self._reduce_metrics(metrics if self.pstate.is_last_stage else None)
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else 0.0
        metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
        metrics["update_skipped"] = 0.0 if ok else 1.0
        return metrics

    def _reduce_metrics(self, metrics: dict[str, float] | None) -> dict[str, float]:
        metrics = broadcast_floats(metrics, self._last_stage_rank(), self.pstate.pp_group)
        if self.pstate.dp_size > 1 and metrics:
            keys = sorted(metrics)
            values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
            torch.distributed.all_reduce(values, group=self.pstate.dp_group)
            metrics = dict(zip(keys, values.tolist(), strict=False))
        return metrics

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step of GRPO on `batch` (old/ref log-probs already filled in)."""
        return self._optimize(batch, self._grpo_loss_fn)

    def sft_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step of next-token likelihood on the masked (response) tokens."""
        sampling_temperature, self.temperature = self.temperature, 1.0
        try:
            return self._optimize(batch, self._sft_loss_fn)
        finally:
            self.temperature = sampling_temperature

    def export_hf(self) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named full tensors of the current policy (world size 1; `weights/` gathers TP/PP)."""
        return self.adapter.export_hf_state(self.model.module)
