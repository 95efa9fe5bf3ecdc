"""Group-relative advantages (GRPO) as pure tensor functions.

A *group* is the set of responses sampled for one prompt. Group ids are arbitrary integers
(not necessarily contiguous or sorted) and groups may have different sizes, so the functions
never assume an `[n_prompts, n]` layout.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["grpo_advantages", "zero_variance_groups"]


def _check_inputs(rewards: Tensor, group_ids: Tensor) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}; flatten it")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a float tensor, got {rewards.dtype}; call .float()")
    if group_ids.shape != rewards.shape:
        raise ValueError(
            f"group_ids must have the shape of rewards {tuple(rewards.shape)}, "
            f"got {tuple(group_ids.shape)}; pass one group id per reward"
        )
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}; call .long()")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf; fix the verifier output before GRPO")


def _group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Dense group index in [0, G) for each sample, and G."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max().item()) + 1 if inverse.numel() else 0
    return inverse, num_groups


def zero_variance_groups(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """True for every sample whose group has all-equal rewards (no learning signal).

    Args:
        rewards: [N] float.
        group_ids: [N] integer, any values.
    Returns:
        [N] bool. A group of size 1 counts as zero-variance.
    """
    _check_inputs(rewards, group_ids)
    if rewards.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=rewards.device)
    index, num_groups = _group_index(group_ids)
    # Exact min == max comparison: no tolerance, so rewards 1.0 and 1.0 + 1e-12 differ.
    fill = rewards.new_empty(num_groups)
    g_min = fill.fill_(float("inf")).scatter_reduce(0, index, rewards, "amin")
    g_max = fill.clone().fill_(float("-inf")).scatter_reduce(0, index, rewards, "amax")
    return (g_min == g_max)[index]


def grpo_advantages(
    rewards: Tensor, group_ids: Tensor, eps: float = 1e-9, normalize_std: bool = True
) -> Tensor:
    """GRPO advantage: (r - group mean) / (group std + eps).

    The std is the *sample* std (Bessel-corrected, divisor n - 1, `torch.std`'s default), as
    in the public GRPO recipes. Invariants:
      * a group of size 1 gets advantage exactly 0 (its sample std is undefined);
      * a group whose rewards are all equal gets exactly 0 (not a rounding residue of the mean);
      * with `normalize_std=False` the result is only mean-centred (Dr. GRPO style).
    Statistics are computed in float64 and the result is cast back to `rewards.dtype`.

    Args:
        rewards: [N] float, one scalar reward per response.
        group_ids: [N] integer, responses with equal id belong to the same prompt group.
        eps: added to the std; must be >= 0.
        normalize_std: divide by (std + eps) when True.
    Returns:
        [N] advantages, dtype of `rewards`.
    """
    _check_inputs(rewards, group_ids)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}; use e.g. 1e-9 (algo.adv_eps)")
    if rewards.numel() == 0:
        return rewards.clone()
    index, num_groups = _group_index(group_ids)
    r = rewards.double()
    count = torch.zeros(num_groups, dtype=torch.float64, device=r.device)
    count.scatter_add_(0, index, torch.ones_like(r))
    mean = torch.zeros_like(count).scatter_add_(0, index, r) / count
    centred = r - mean[index]
    adv = centred
    if normalize_std:
        sq = torch.zeros_like(count).scatter_add_(0, index, centred * centred)
        # Size-1 groups divide by clamp(0, 1) = 1 here and are zeroed below.
        std = (sq / (count - 1).clamp(min=1)).sqrt()
        adv = centred / (std[index] + eps)
    flat = zero_variance_groups(rewards, group_ids)
    adv = torch.where(flat, torch.zeros_like(adv), adv)
    return adv.to(rewards.dtype)
