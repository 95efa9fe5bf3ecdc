"""MetaStone-S1's self-supervised process reward model (SPRM, arXiv 2507.01951): the pure tensor
functions of its step-scoring head (the head module is `spark_mcore.models.step_head`).

A head on the policy's second-to-last hidden state scores each reasoning step at the position
before the step delimiter (e.g. ".\\n\\n"). Every step of a response is labelled with the
response's outcome (correct = 1). Training: BCE-with-logits per step, keeping only steps whose
current prediction agrees with the label, with class weights from global counts (positive
1.5 * N_neg / N, negative N_pos / N); the backbone receives the head's gradient scaled by 1e-4.
At test time a response's score is the geometric mean of its sigmoid step scores, and best-of-N
picks the argmax.

Wired into the trainer by `model.step_head=true` (spark_mcore.trainer.step_head).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "agreement_filter",
    "best_of_n",
    "class_weights",
    "gather_step_states",
    "geometric_mean_scores",
    "scale_gradient",
    "step_bce_loss",
    "step_positions",
]


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the incoming gradient times `scale` backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def scale_gradient(x: Tensor, scale: float) -> Tensor:
    """x unchanged in the forward; d(loss)/dx is multiplied by `scale` on its way back (SPRM:
    1e-4, so the head's loss barely moves the backbone). scale 0 stops the gradient."""
    if scale < 0:
        raise ValueError(f"gradient scale must be >= 0, got {scale}")
    return _ScaleGradient.apply(x, scale)


def step_positions(token_ids: Tensor, delimiter: list[int], include_end: bool = False) -> Tensor:
    """Positions scored by the head: the token before each occurrence of `delimiter` (a token-id
    sequence, e.g. the ids of ".\\n\\n") in one response.

    Args:
        token_ids: [L] long, the response tokens (response-relative positions are returned).
        delimiter: non-empty token-id sequence.
        include_end: also score the response's last token when it is not already a step end
            (a final step without a trailing delimiter).
    Returns:
        [S] long, increasing. A delimiter at position 0 has no token before it and is skipped.
    """
    if not delimiter:
        raise ValueError("the step delimiter must be a non-empty token-id sequence")
    ids = token_ids.reshape(-1)
    k, n = len(delimiter), ids.numel()
    pos = torch.zeros(0, dtype=torch.long, device=ids.device)
    if n >= k:
        windows = ids.unfold(0, k, 1)  # [n - k + 1, k]
        starts = (windows == torch.tensor(delimiter, device=ids.device)).all(dim=1).nonzero().flatten()
        pos = starts[starts > 0] - 1
    if include_end and n > 0:
        last = n - 1
        # a response ending in the delimiter has its last step scored already
        ends_with_delim = n >= k and bool((ids[n - k:] == torch.tensor(delimiter, device=ids.device)).all())
        if not ends_with_delim and not bool((pos == last).any()):
            pos = torch.cat([pos, pos.new_tensor([last])])
    return pos


def gather_step_states(hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """Hidden states at the step positions.

    Args:
        hidden: [B, T, C] (batch first; transpose megatron's [T, B, C] first).
        positions: [B, S] long, -1 pads rows with fewer steps.
    Returns:
        ([B, S, C] states, zeros at padding; [B, S] bool step mask).
    """
    if hidden.dim() != 3 or positions.dim() != 2 or positions.shape[0] != hidden.shape[0]:
        raise ValueError(f"hidden must be [B, T, C] and positions [B, S]; got {tuple(hidden.shape)} and "
                         f"{tuple(positions.shape)}")
    valid = positions >= 0
    if bool((positions >= hidden.shape[1]).any()):
        raise ValueError(f"a step position is >= T = {hidden.shape[1]}")
    idx = positions.clamp(min=0)[..., None].expand(-1, -1, hidden.shape[2])
    states = hidden.gather(1, idx)
    return states * valid[..., None].to(states.dtype), valid


def agreement_filter(logits: Tensor, labels: Tensor) -> Tensor:
    """True for steps whose current prediction (sigmoid > 0.5, i.e. logit > 0) equals the label
    (> 0.5): SPRM trains only on those, so noisy outcome labels of single steps are skipped."""
    if logits.shape != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ")
    return (logits.detach() > 0) == (labels > 0.5)


def class_weights(num_pos: float, num_neg: float, positive_factor: float = 1.5) -> tuple[float, float]:
    """(positive, negative) weights from global step counts, N = num_pos + num_neg:
    positive positive_factor * num_neg / N (paper: 1.5), negative num_pos / N. (0, 0) when N
    is 0."""
    if num_pos < 0 or num_neg < 0:
        raise ValueError(f"step counts must be >= 0, got {num_pos}, {num_neg}")
    total = num_pos + num_neg
    if total == 0:
        return 0.0, 0.0
    return positive_factor * num_neg / total, num_pos / total


def step_bce_loss(logits: Tensor, labels: Tensor, keep: Tensor, pos_weight: float,
                  neg_weight: float, denominator: float | Tensor | None = None) -> Tensor:
    """Class-weighted BCE-with-logits, mean over the kept steps (weighted sum / kept count), or
    weighted sum / `denominator` when given (the trainer divides by the global step count, which
    is known before the forward, so micro-batch and DP shares add up to the batch loss).

    Args:
        logits: [...] head outputs; labels: [...] 0/1; keep: [...] bool (step mask and
            `agreement_filter`).
        pos_weight, neg_weight: from `class_weights`.
    Returns:
        0-dim; 0 (with a graph) when no step is kept.
    """
    if not logits.shape == labels.shape == keep.shape:
        raise ValueError(f"logits {tuple(logits.shape)}, labels {tuple(labels.shape)} and keep "
                         f"{tuple(keep.shape)} must have one shape")
    target = (labels > 0.5).to(logits.dtype)
    weight = torch.where(target > 0, torch.full_like(target, pos_weight), torch.full_like(target, neg_weight))
    safe = torch.where(keep, logits, torch.zeros_like(logits))
    per_step = F.binary_cross_entropy_with_logits(safe, target, reduction="none") * weight
    total = torch.where(keep, per_step, torch.zeros_like(per_step)).sum()
    if denominator is not None:
        return total / denominator
    return total / keep.sum().clamp(min=1)


def geometric_mean_scores(step_logits: Tensor, step_mask: Tensor) -> Tensor:
    """[N, S] logits, [N, S] bool -> [N] response scores exp(mean log sigmoid(logit)) over its
    steps (the geometric mean of the step probabilities); 0 for a response without steps."""
    if step_logits.shape != step_mask.shape:
        raise ValueError(f"step_logits {tuple(step_logits.shape)} and step_mask "
                         f"{tuple(step_mask.shape)} differ")
    logsig = torch.where(step_mask, F.logsigmoid(step_logits.double()), torch.zeros((), dtype=torch.float64))
    count = step_mask.sum(dim=-1)
    score = torch.exp(logsig.sum(dim=-1) / count.clamp(min=1))
    return torch.where(count > 0, score, torch.zeros_like(score)).to(step_logits.dtype)


def best_of_n(scores: Tensor) -> Tensor:
    """[..., N] scores -> [...] index of the best response (the first one on ties)."""
    if scores.shape[-1] == 0:
        raise ValueError("best_of_n needs at least one response")
    return scores.argmax(dim=-1)
