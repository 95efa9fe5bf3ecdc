"""Prefix-RFT (arXiv 2507.01679) as pure tensor functions: demonstration prefixes in a group.

Some members of a prompt's group continue from a prefix of a demonstration (a fraction p of its
tokens, p drawn per member from [low, high]; low and high follow a cosine schedule over the
training steps), the rest are on-policy. All share one group baseline (Dr. GRPO: r - mean, no
std). Prefix tokens are part of the response under a prefix mask: their loss is the
advantage-weighted log-likelihood -A * log pi(a_t) (no importance ratio, no clip), and only the
highest-entropy fraction (0.2) of the batch's prefix tokens keep their advantage; on-policy
tokens take the PPO-clip surrogate. Both kinds are aggregated together (`aggregate`).

Generation from prompt + prefix is not wired yet (`rollout.prefix.enabled` is refused at
config time); these functions are the loss side of it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from spark_mcore.algo.advantages import grpo_advantages
from spark_mcore.algo.losses import aggregate

__all__ = [
    "cosine_schedule",
    "dr_grpo_advantages",
    "draw_prefix_fractions",
    "entropy_keep_mask",
    "prefix_fraction_bounds",
    "prefix_lengths",
    "prefix_mask",
    "prefix_rft_loss",
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


def prefix_rft_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, prefix: Tensor,
                    keep: Tensor, clip_eps: float, clip_eps_high: float | None = None,
                    agg: str = "token_mean", normalizer: float | None = None
                    ) -> tuple[Tensor, dict[str, Tensor]]:
    """Prefix-RFT objective over one batch.

    On-policy tokens (mask and not prefix): -min(r A, clip(r, 1 - eps, 1 + eps_high) A), r =
    exp(logp - old_logp). Prefix tokens: -A' logp with A' = A where `keep`, else 0 (they still
    count in the token mean). Masked-out positions never reach values or gradients.

    Args:
        logp, old_logp: [B, T] log-probs; advantages: [B] (broadcast) or [B, T].
        mask: [B, T] response mask, prefix tokens included; prefix, keep: [B, T] bool.
        clip_eps, clip_eps_high, agg, normalizer: as in `policy_loss` / `aggregate`.
    Returns:
        (loss, metrics): prefix_token_frac, prefix_kept_frac (of prefix tokens), clip_frac (of
        on-policy tokens); detached.
    """
    for name, t in (("old_logp", old_logp), ("mask", mask), ("prefix", prefix), ("keep", keep)):
        if t.shape != logp.shape:
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
    nll = -torch.where(pre & keep.bool(), adv, zero) * torch.where(pre, logp, zero)
    values = torch.where(pre, nll, torch.where(onp, ppo, zero))
    loss = aggregate(values, bmask, agg, normalizer)
    with torch.no_grad():
        n_pre = pre.sum().clamp(min=1).double()
        metrics = {"prefix_token_frac": pre.sum().double() / bmask.sum().clamp(min=1),
                   "prefix_kept_frac": (pre & keep.bool()).sum().double() / n_pre,
                   "clip_frac": ((clipped < surr) & onp).sum().double() / onp.sum().clamp(min=1)}
    return loss, metrics
