"""Prefix-RFT (arXiv 2507.01679) as pure tensor functions: demonstration prefixes in a group.

Some members of a prompt's group continue from a prefix of a demonstration (a fraction p of its
tokens, p drawn per member from [low, high]; low and high follow a cosine schedule over the
training steps), the rest are on-policy. All share one group baseline (Dr. GRPO: r - mean, no
std). Prefix tokens are part of the response under a prefix mask: their loss is the
advantage-weighted log-likelihood -A * log pi(a_t) (no importance ratio, no clip), and only the
highest-entropy fraction (0.2) of the batch's prefix tokens keep their advantage; on-policy
tokens take the PPO-clip surrogate. Both kinds are aggregated together (`aggregate`).

Wiring: `spark_mcore.rollout.prefix` generates the prefixed members, `groups_to_batch` sets
the batch's prefix mask and the Dr. GRPO baseline of prefix groups, `prefix_token_advantages`
folds the entropy keep-mask into [B, T] advantages once the trainer's entropies are known, and
`grpo_loss(prefix=...)` applies `prefix_rft_loss` per micro-batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from spark_mcore.algo.advantages import grpo_advantages
from spark_mcore.algo.losses import _k3, aggregate

__all__ = [
    "cosine_schedule",
    "dr_grpo_advantages",
    "draw_prefix_fractions",
    "entropy_keep_mask",
    "prefix_fraction_bounds",
    "prefix_lengths",
    "prefix_mask",
    "prefix_rft_loss",
    "prefix_token_advantages",
]


def cosine_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """start + (end - start) * (1 - cos(pi * s / total)) / 2 with s clamped to [0, total];
    `start` at step <= 0, `end` from step >= total_steps (and always when total_steps <= 0)."""
    if total_steps <= 0:
        return end
    s = min(max(step, 0), total_steps) / total_steps
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * s))


def prefix_fraction_bounds(step: int, total_steps: int, low: tuple[float, float],
                           high: tuple[float, float]) -> tuple[float, float]:
    """(low, high) bounds of the prefix fraction at `step`: each a `cosine_schedule` from its
    (start, end) pair, clamped into [0, 1] and with low <= high."""
    lo = min(max(cosine_schedule(step, total_steps, *low), 0.0), 1.0)
    hi = min(max(cosine_schedule(step, total_steps, *high), 0.0), 1.0)
    return min(lo, hi), hi


def draw_prefix_fractions(members: int, low: float, high: float,
                          generator: torch.Generator | None = None) -> Tensor:
    """[members] float64 fractions drawn uniformly from [low, high] (one per prefixed member)."""
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"prefix fraction bounds must satisfy 0 <= low <= high <= 1, got [{low}, {high}]")
    u = torch.rand(members, generator=generator, dtype=torch.float64)
    return low + (high - low) * u


def prefix_lengths(fractions: Tensor, demo_lengths: Tensor) -> Tensor:
    """[N] long: floor(p * demonstration length) tokens of each member's prefix."""
    if fractions.shape != demo_lengths.shape:
        raise ValueError(f"fractions {tuple(fractions.shape)} and demo_lengths "
                         f"{tuple(demo_lengths.shape)} differ")
    return torch.floor(fractions.double() * demo_lengths.double() + 1e-9).long().clamp(min=0)


def prefix_mask(lengths: Tensor, loss_mask: Tensor) -> Tensor:
    """[B, T] bool: the first `lengths[i]` response tokens of row i (response = the row's
    contiguous run of loss_mask 1, after its prompt). A length of 0 marks an on-policy member.
    """
    bmask = loss_mask.bool()
    if lengths.shape != bmask.shape[:1]:
        raise ValueError(f"lengths must be [B] = {tuple(bmask.shape[:1])}, got {tuple(lengths.shape)}")
    if bool((lengths > bmask.sum(dim=1)).any()):
        raise ValueError("a prefix is longer than its response; the response must contain the prefix")
    rank = bmask.long().cumsum(dim=1)  # 1 on the first response token, 2 on the second, ...
    return bmask & (rank <= lengths[:, None])


def entropy_keep_mask(entropy: Tensor, prefix: Tensor, keep_fraction: float = 0.2) -> Tensor:
    """[B, T] bool: the ceil(keep_fraction * n) highest-entropy of the n prefix tokens of the
    batch (ties: the earlier row-major position wins). Only these keep their advantage.

    Args:
        entropy: [B, T] policy entropy at each token (no gradient needed).
        prefix: [B, T] bool prefix mask.
        keep_fraction: in (0, 1] (rollout.prefix.entropy_keep).
    """
    if entropy.shape != prefix.shape:
        raise ValueError(f"entropy {tuple(entropy.shape)} must have the prefix mask's shape "
                         f"{tuple(prefix.shape)}")
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    flat_prefix = prefix.bool().reshape(-1)
    count = int(flat_prefix.sum())
    keep = torch.zeros_like(flat_prefix)
    if count == 0:
        return keep.reshape(prefix.shape)
    k = math.ceil(keep_fraction * count - 1e-9)
    lowest = torch.tensor(-math.inf, dtype=torch.float64)
    score = torch.where(flat_prefix, entropy.detach().reshape(-1).double(), lowest)
    order = torch.argsort(score, descending=True, stable=True)
    keep[order[:k]] = True
    return keep.reshape(prefix.shape)


def dr_grpo_advantages(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Dr. GRPO's group baseline: r - group mean, no std division ([N] -> [N])."""
    return grpo_advantages(rewards, group_ids, normalize_std=False)


def prefix_token_advantages(advantages: Tensor, loss_mask: Tensor, prefix: Tensor, entropy: Tensor,
                            keep_fraction: float) -> tuple[Tensor, dict[str, float]]:
    """[B, T] advantages in which only the `entropy_keep_mask` prefix tokens (the highest-entropy
    keep_fraction of the batch's prefix tokens) keep their advantage; the other prefix tokens
    get 0, on-policy tokens keep theirs, positions off loss_mask are 0.

    Args:
        advantages: [B] (one per sequence) or [B, T] (per token, e.g. SPRO).
        loss_mask: [B, T]; prefix: [B, T] bool; entropy: [B, T] trainer entropy per token.
        keep_fraction: rollout.prefix.entropy_keep, in (0, 1].
    Returns:
        (advantages [B, T], metrics): prefix_kept_frac (kept share of the prefix tokens),
        prefix_entropy (mean entropy of the prefix tokens), 0.0 without prefix tokens.
    """
    if advantages.shape not in (loss_mask.shape[:1], loss_mask.shape):
        raise ValueError(f"advantages must be [B] or [B, T] for loss_mask {tuple(loss_mask.shape)}, "
                         f"got {tuple(advantages.shape)}")
    bmask = loss_mask.bool()
    pre = prefix.bool() & bmask
    keep = entropy_keep_mask(entropy, pre, keep_fraction)
    full = advantages.unsqueeze(1).expand(loss_mask.shape) if advantages.dim() == 1 else advantages
    zero = torch.zeros((), dtype=full.dtype, device=full.device)
    out = torch.where(bmask & ~(pre & ~keep), full, zero)
    n = int(pre.sum())
    metrics = {"prefix_kept_frac": float(keep.sum()) / n if n else 0.0,
               "prefix_entropy": float(torch.where(pre, entropy.double(), 0.0).sum()) / n if n else 0.0}
    return out.contiguous(), metrics


def prefix_rft_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, prefix: Tensor,
                    keep: Tensor | None, clip_eps: float, clip_eps_high: float | None = None,
                    agg: str = "token_mean", normalizer: float | None = None,
                    is_weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Prefix-RFT objective over one batch.

    On-policy tokens (mask and not prefix): -min(r A, clip(r, 1 - eps, 1 + eps_high) A), r =
    exp(logp - old_logp), times `is_weights` when given (truncated importance sampling). Prefix
    tokens: -A' logp with A' = A where `keep`, else 0 (they still count in the token mean); no
    ratio, no clip, no importance weight. Masked-out positions never reach values or gradients.

    Args:
        logp, old_logp: [B, T] log-probs; advantages: [B] (broadcast) or [B, T].
        mask: [B, T] response mask, prefix tokens included; prefix: [B, T] bool.
        keep: [B, T] bool, or None when the advantages already carry the keep-mask (every
            prefix token keeps its advantage: `prefix_token_advantages` zeroed the others).
        clip_eps, clip_eps_high, agg, normalizer: as in `policy_loss` / `aggregate`.
        is_weights: [B, T] constant weights of the on-policy tokens, or None.
    Returns:
        (loss, metrics): prefix_token_frac, prefix_kept_frac (of prefix tokens), clip_frac
        (clipped on-policy tokens, as a share of all response tokens like every token-mean
        metric, so micro-batch shares add up; prefix tokens are never clipped), ratio_mean and
        approx_kl (k3 of old vs new) as in `policy_loss` (prefix tokens count as ratio 1);
        detached.
    """
    keep = prefix if keep is None else keep
    for name, t in (("old_logp", old_logp), ("mask", mask), ("prefix", prefix), ("keep", keep),
                    ("is_weights", is_weights)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} must have shape {tuple(logp.shape)} like logp [B, T], "
                             f"got {tuple(t.shape)}")
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(f"advantages must be [B] or [B, T] for logp {tuple(logp.shape)}, "
                         f"got {tuple(advantages.shape)}")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    bmask = mask.bool()
    pre = prefix.bool() & bmask
    onp = bmask & ~pre
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    adv = advantages.detach().to(logp.dtype)
    adv = torch.where(bmask, adv.unsqueeze(-1).expand_as(logp) if adv.dim() == 1 else adv, zero)
    ratio = torch.exp(torch.where(onp, logp - old_logp.detach(), zero))
    surr, clipped = ratio * adv, ratio.clamp(1.0 - clip_eps, 1.0 + high) * adv
    ppo = -torch.minimum(surr, clipped)
    if is_weights is not None:
        ppo = ppo * is_weights.detach().to(logp.dtype)
    nll = -torch.where(pre & keep.bool(), adv, zero) * torch.where(pre, logp, zero)
    values = torch.where(pre, nll, torch.where(onp, ppo, zero))
    loss = aggregate(values, bmask, agg, normalizer)
    with torch.no_grad():
        n_pre = pre.sum().clamp(min=1).double()
        metrics = {"prefix_token_frac": pre.sum().double() / bmask.sum().clamp(min=1),
                   "prefix_kept_frac": (pre & keep.bool()).sum().double() / n_pre,
                   "clip_frac": ((clipped < surr) & onp).sum().double() / bmask.sum().clamp(min=1),
                   # as in `policy_loss`, token means over the response (prefix tokens: ratio 1, kl 0)
                   "ratio_mean": torch.where(bmask, ratio, zero).sum().double() / bmask.sum().clamp(min=1),
                   "approx_kl": torch.where(onp, _k3(torch.log(ratio)), zero).sum().double()
                   / bmask.sum().clamp(min=1)}
    return loss, metrics
