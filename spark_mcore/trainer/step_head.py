"""The SPRM step head (MetaStone-S1, arXiv 2507.01951) inside the Megatron actor
(`model.step_head=true`).

Where: on the last pipeline stage, reading the output of the second-to-last transformer layer
(global layer number num_layers - 1) through a forward hook on that layer; a layout that puts
the layer on an earlier stage is refused. Replicated over TP: every TP rank builds the head
from the same seed, sees the same (replicated) hidden states and draws the same dropout mask,
so heads, gradients and updates stay identical without communication; gradients are averaged
over DP. Its own AdamW (step_head.lr / weight_decay / grad_clip) steps after the policy's.

Loss (policy rows only, during GRPO steps): each step of a response is labelled with the
response's verified outcome; class-weighted BCE-with-logits over the steps whose current
prediction agrees with the label, divided by the global step count N (known before the
forward, so micro-batch and DP shares add up exactly); class weights from the DP-summed
counts. The backbone receives the head's gradient scaled by step_head.backbone_grad_scale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from spark_mcore.algo.step_head import agreement_filter, class_weights, gather_step_states, step_bce_loss
from spark_mcore.config.loader import ConfigError
from spark_mcore.distributed.parallel import ParallelState
from spark_mcore.models.config import StepHeadConfig
from spark_mcore.models.step_head import StepHead
from spark_mcore.types import TrainBatch

STATE_FILE = "step_head.pt"
_SEED_OFFSET = 7919  # the head's init seed is trainer.seed + this (not the TP-offset RNG)


def find_layer(chunk: torch.nn.Module, layer_number: int) -> torch.nn.Module | None:
    """The transformer layer with global `layer_number` (1-based) in a model chunk (a GPTModel,
    or a vision-language model holding one), if this chunk has it."""
    decoder = getattr(chunk, "decoder", None)
    layers = list(getattr(decoder, "layers", [])) if decoder is not None else [
        m for m in chunk.modules() if hasattr(m, "layer_number") and hasattr(m, "self_attention")]
    for layer in layers:
        if getattr(layer, "layer_number", None) == layer_number:
            return layer
    return None


class StepHeadTrainer:
    """The head, its optimizer and the hook, on one last-stage rank."""

    def __init__(self, cfg: StepHeadConfig, chunk: torch.nn.Module, num_layers: int, hidden_size: int,
                 pstate: ParallelState, seed: int, sequence_parallel: bool = False) -> None:
        layer = find_layer(chunk, num_layers - 1)
        if layer is None:
            raise ConfigError(
                f"model.step_head=true reads layer {num_layers - 1} of {num_layers} (the second-to-last), which "
                f"this pipeline layout (parallel.pp={pstate.pp_size}) does not put on the last stage's last "
                "model chunk. Fix: fewer pipeline stages (or virtual stages) so that the last one holds >= 2 "
                "layers, or model.step_head=false")
        self.cfg, self.pstate, self.seed = cfg, pstate, seed
        self.sequence_parallel = sequence_parallel
        self.head = StepHead(hidden_size, dropout=cfg.dropout, backbone_grad_scale=cfg.backbone_grad_scale)
        self.head.init_weights(seed + _SEED_OFFSET)
        self.head.to(pstate.device)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.steps = 0  # head optimizer steps: with the micro-batch index they seed the dropout masks
        self.active = False
        self._hidden: Tensor | None = None
        self._hook = layer.register_forward_hook(self._capture)
        self._reset_step()

    # ---- per optimizer step --------------------------------------------------------------
    def _reset_step(self) -> None:
        self.weights = (0.0, 0.0)
        self.num_steps = 0.0
        self._mb = 0
        self._sums = torch.zeros(3, dtype=torch.float64)  # weighted loss share, kept, scored steps

    def begin(self, batch: TrainBatch) -> bool:
        """Before the forward-backward of an optimizer step on this rank's slice: global step
        counts (DP all-reduce) give the class weights and the normaliser. Returns whether the
        head trains on this step (some DP rank has a scored step); collective over DP."""
        self._reset_step()
        counts = torch.zeros(2, dtype=torch.float64, device=self.pstate.device)
        if batch.step_positions is not None and batch.outcomes is not None:
            per_row = (batch.step_positions >= 0).sum(dim=1).double()
            pos = float((per_row * (batch.outcomes > 0.5).double()).sum())
            counts += torch.tensor([pos, float(per_row.sum()) - pos], dtype=torch.float64, device=counts.device)
        if self.pstate.dp_size > 1:
            dist.all_reduce(counts, group=self.pstate.dp_group)
        n_pos, n_neg = counts.tolist()
        self.weights = class_weights(n_pos, n_neg, self.cfg.positive_factor)
        self.num_steps = n_pos + n_neg
        self.active = self.num_steps > 0
        if self.active:
            self.head.train()
            self.optimizer.zero_grad(set_to_none=True)
        return self.active

    def _capture(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self.active:
            self._hidden = output[0] if isinstance(output, tuple) else output

    def loss(self, seqs: TrainBatch, unpack: Any, tokens_shape: torch.Size) -> Tensor | None:
        """This micro-batch's share of the head loss (weighted BCE sum over its kept steps / N),
        from the hidden states the hook captured in its forward; None when the head is idle.
        `unpack` maps [R, L, C] model layout to [b, T, C] (packed micro-batches)."""
        hidden, self._hidden = self._hidden, None
        if not self.active or hidden is None or seqs.step_positions is None or seqs.outcomes is None:
            return None
        if self.sequence_parallel and self.pstate.tp_size > 1:  # [s/tp, b, C] -> [s, b, C] (TE only: untested on CPU)
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False,
                                                          group=self.pstate.tp_group)
        states = unpack(hidden.transpose(0, 1).reshape(*tokens_shape, hidden.shape[-1]))  # [b, T, C]
        positions = seqs.step_positions.to(states.device)
        states, mask = gather_step_states(states, positions)
        gen = torch.Generator(device=states.device).manual_seed(
            hash((self.seed, self.steps, self.pstate.dp_rank, self._mb)) % (2 ** 62))
        self._mb += 1
        logits = self.head(states.float(), generator=gen)  # [b, S]
        labels = seqs.outcomes.to(logits.device)[:, None].expand_as(logits)
        keep = agreement_filter(logits, labels) & mask
        loss = step_bce_loss(logits, labels, keep, *self.weights, denominator=self.num_steps)
        self._sums += torch.tensor([float(loss.detach()), float(keep.sum()), float(mask.sum())], dtype=torch.float64)
        return loss

    def finish(self, loss_scale: float, update: bool) -> dict[str, float]:
        """After the policy's optimizer step: DP-average the head's gradients, clip, step.
        Returns this DP rank's metric sums (the caller sums them over DP)."""
        self.active = False
        self._hidden = None
        if self.num_steps == 0:
            return {}
        params = [p for p in self.head.parameters()]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads]) / loss_scale
        if self.pstate.dp_size > 1:
            dist.all_reduce(flat, group=self.pstate.dp_group)
            flat /= self.pstate.dp_size
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip) if self.cfg.grad_clip > 0 else \
            torch.linalg.vector_norm(flat)
        if update:
            self.optimizer.step()
            self.steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, kept, scored = self._sums.tolist()
        # kept and scored are summed over DP by the caller; the grad norm is already global
        return {"step_head/loss": loss_sum, "step_head/kept": kept, "step_head/steps": scored,
                "step_head/grad_norm": float(norm) / max(self.pstate.dp_size, 1)}

    # ---- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                "steps": torch.tensor(self.steps)}

    def save(self, ckpt_dir: Path) -> None:
        """Written by one rank holding the head (the replicas are identical)."""
        if self.pstate.tp_rank == 0 and self.pstate.dp_rank == 0 and self.pstate.cp_rank == 0:
            torch.save(self.state_dict(), ckpt_dir / STATE_FILE)

    def load(self, ckpt_dir: Path) -> bool:
        """Restores weights, AdamW state and the step counter; False when `ckpt_dir` has none."""
        path = ckpt_dir / STATE_FILE
        if not path.is_file():
            return False
        state = torch.load(path, map_location=self.pstate.device, weights_only=True)  # tensors only, no code
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])
        return True


def finish_metrics(sums: dict[str, float]) -> dict[str, float]:
    """DP-summed metric sums -> the logged metrics: step_head/loss (the objective), acc (share
    of scored steps whose prediction agrees with the label, before the update), kept (count of
    steps in the loss), steps (count scored)."""
    if "step_head/steps" not in sums:
        return {}
    scored = sums["step_head/steps"]
    return {"step_head/loss": sums["step_head/loss"], "step_head/acc": sums["step_head/kept"] / max(scored, 1.0),
            "step_head/kept": sums["step_head/kept"], "step_head/steps": scored,
            "step_head/grad_norm": sums["step_head/grad_norm"]}
